//! `login-metrics tail`: the metrics log read back by people.
//!
//! The metrics log ([`crate::sink::metrics_log`]) holds one JSON packet per line,
//! spread over `PATH.N.gz` (oldest) ... `PATH.1.gz`, `PATH.0` (a rotation not
//! yet compressed, while there is one) and `PATH` (newest). This
//! module prints them in that order, which is publication order: either a few
//! readable lines per packet ([`format_packet`]) or the JSON lines unchanged
//! (but for the escapes below).
//! With `follow` it then keeps printing packets as they are appended, across
//! rotations, like `tail -F`.
//!
//! A line that is not a packet (a write torn by a crash, a stray edit, a
//! packet of a newer schema) is reported with its file and line number and
//! skipped: one bad line must not keep anyone from reading the rest of a log.
//!
//! The values of a packet come from whoever produces to the input topic, and
//! this output goes to an operator's terminal: a control character in a value
//! could move the cursor, retitle the window, clear the screen or reorder
//! what is shown. Every character a terminal may act on rather than display
//! ([`is_hidden`]) is therefore shown escaped, in the readable lines (`\u{1b}`),
//! in diagnostics that quote the file, and in `--json` lines (`\u001b`, the
//! same JSON value).

use std::borrow::Cow;
use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use chrono::{DateTime, Utc};
use flate2::read::MultiGzDecoder;
use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;

use crate::core::packet::{Packet, SliceMetrics, SCHEMA_VERSION};
use crate::sink::metrics_log::{pending_path, rotated_path};

/// Repeated combinations shown per slice. A packet lists up to `analysis.top`
/// (100 by default) of them; in a terminal the first few say what is going on
/// and the rest are counted.
pub const TOP_SHOWN: usize = 3;

/// Values longer than this (user ids, device ids of some clients, 32-character
/// pseudonyms) are cut, so that three combinations fit on a line; IPv4
/// addresses, versions, locales and device types always fit. `--json` has them whole.
const LONG_VALUE: usize = 16;
/// What is kept of a long value: like a short commit hash, enough to tell
/// the rows of one packet apart and to grep for.
const CUT_TO: usize = 8;

/// How long `follow` sleeps between looks at the file: short enough to feel
/// live, long enough to cost nothing (one `stat` and one small read a poll).
pub const POLL: Duration = Duration::from_millis(200);

/// Bytes from the top of the live file remembered while following: a file
/// truncated and written again past the old size still starts differently
/// (the first line holds a packet id), so the rotation is not missed.
const HEAD: usize = 64;

/// Whether a terminal may act on `c` instead of showing it: the C0 controls,
/// DEL, the C1 controls (U+0080–U+009F: U+009B starts an escape sequence on
/// its own in some terminals), and the invisible characters that reorder or
/// break text (bidi marks, embeddings, overrides and isolates; line and
/// paragraph separators), with which a value can make a line read as
/// something it is not.
fn is_hidden(c: char) -> bool {
    matches!(
        c,
        '\u{0}'..='\u{1f}'
            | '\u{7f}'..='\u{9f}'
            | '\u{61c}'
            | '\u{200e}'
            | '\u{200f}'
            | '\u{2028}'..='\u{202e}'
            | '\u{2066}'..='\u{2069}'
    )
}

/// `s` with every [`is_hidden`] character written as `\u{..}`, so that it
/// shows on a terminal as text and nothing else.
fn visible(s: &str) -> Cow<'_, str> {
    if !s.chars().any(is_hidden) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        if is_hidden(c) {
            let _ = write!(out, "{}", c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// A JSON text with every [`is_hidden`] character written as a JSON escape
/// (`\u009b`): the same JSON value, shown as text. serde_json already
/// escapes the C0 controls inside strings, but not DEL, the C1 controls nor
/// the bidi characters. Valid JSON can hold those only inside strings, where
/// the escape means the same character; tabs, newlines and carriage returns
/// outside strings are whitespace and are kept.
fn json_visible(line: &[u8]) -> Cow<'_, [u8]> {
    let Ok(text) = std::str::from_utf8(line) else {
        return Cow::Borrowed(line);
    };
    let escape = |c: char| is_hidden(c) && !matches!(c, '\t' | '\n' | '\r');
    if !text.chars().any(escape) {
        return Cow::Borrowed(line);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if escape(c) {
            let _ = write!(out, "\\u{:04x}", c as u32);
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out.into_bytes())
}

/// What `tail` prints and whether it keeps following.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// Print the packets' JSON lines byte for byte instead of readable lines
    /// (but for characters a terminal would act on, written as JSON escapes).
    pub json: bool,
    /// After what exists, keep printing appended packets until `stop`.
    pub follow: bool,
}

/// `login-metrics tail`: the metrics log on stdout, diagnostics on stderr.
pub async fn run(
    path: PathBuf,
    options: Options,
    stop: CancellationToken,
) -> std::process::ExitCode {
    use std::process::ExitCode;
    let result = tokio::task::spawn_blocking(move || {
        let mut out = io::BufWriter::new(io::stdout().lock());
        tail(&path, options, &mut out, &mut io::stderr(), &stop)
    })
    .await;
    match result {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("login-metrics tail: {}", visible(&format!("{e:#}")));
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("login-metrics tail: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Prints the metrics log at `path` to `out`: the rotated files oldest first,
/// then `path` itself. Lines that are not packets are reported to `diag` and
/// skipped. With [`Options::follow`] it then waits for appended lines and
/// rotations until `stop` is cancelled.
///
/// An error is returned only when there is no log at all, when its directory
/// or the live file cannot be read, or when `out` fails; a reader that went
/// away (`| head`) is not an error.
pub fn tail(
    path: &Path,
    options: Options,
    out: &mut dyn Write,
    diag: &mut dyn Write,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    match print_log(path, options, out, diag, stop) {
        Err(e) if is_broken_pipe(&e) => Ok(()),
        other => other,
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<io::Error>()
            .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe)
    })
}

fn print_log(
    path: &Path,
    options: Options,
    out: &mut dyn Write,
    diag: &mut dyn Write,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let rotated = rotated_files(path)?;
    let mut live = Live::new(path);
    live.open()?;
    if live.file.is_none() && rotated.is_empty() {
        bail!(
            "no metrics log at {} (nor rotated {}.N.gz files)",
            path.display(),
            path.display()
        );
    }
    let mut printer = Printer {
        json: options.json,
        out,
        diag,
    };
    for file in &rotated {
        printer.rotated_file(file, true)?;
    }
    let pending = pending_path(path);
    if pending.exists() {
        printer.rotated_file(&pending, false)?;
    }
    live.read_available(&mut printer)?;
    if !options.follow {
        live.finish(&mut printer)?;
        printer.out.flush()?;
        return Ok(());
    }
    loop {
        printer.out.flush()?;
        if stop.is_cancelled() {
            return Ok(());
        }
        std::thread::sleep(POLL);
        live.poll(&mut printer)?;
    }
}

/// The rotated files of the log at `path` that exist, oldest first
/// (`PATH.N.gz` ... `PATH.1.gz`). The directory is listed rather than probed
/// from 1 up, so that a gap (a file removed by hand, `metrics_log.keep`
/// lowered) hides nothing. The compressed copy being written is
/// `PATH.1.gz.tmp` and is left out; the uncompressed rotation waiting for it,
/// `PATH.0`, is read after these.
pub fn rotated_files(path: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        bail!("{}: not a file name", path.display());
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("cannot list {}", dir.display())),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
        let file_name = entry.file_name();
        let Some(n) = file_name
            .to_str()
            .and_then(|f| f.strip_prefix(name)?.strip_prefix('.')?.strip_suffix(".gz"))
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|&n| n >= 1)
        else {
            continue;
        };
        let rotated = rotated_path(path, n);
        // Only the canonical spelling: `PATH.01.gz` is not a rotation.
        if rotated.file_name() == Some(file_name.as_os_str()) {
            found.push((n, rotated));
        }
    }
    found.sort_by_key(|(n, _)| std::cmp::Reverse(*n));
    Ok(found.into_iter().map(|(_, p)| p).collect())
}

/// Turns lines into output: readable lines or the JSON unchanged, and a
/// report for a line that is not a packet. Only failures of `out` are errors.
struct Printer<'a> {
    json: bool,
    out: &'a mut dyn Write,
    diag: &'a mut dyn Write,
}

impl Printer<'_> {
    /// One line as read, with its newline when it has one (a line without is
    /// the last of a file, possibly torn).
    fn line(&mut self, file: &Path, number: u64, line: &[u8]) -> io::Result<()> {
        // A blank line carries nothing to lose; the log never has one.
        if line.iter().all(u8::is_ascii_whitespace) {
            return Ok(());
        }
        let complete = line.ends_with(b"\n");
        match serde_json::from_slice::<Packet>(line) {
            // Added fields are read past; a newer version is a breaking change.
            Ok(packet) if packet.schema_version > SCHEMA_VERSION => {
                self.report(format_args!(
                    "{}:{number}: skipped, a packet of schema version {} (this reader knows up to {SCHEMA_VERSION}): use a newer login-metrics tail",
                    file.display(),
                    packet.schema_version
                ));
            }
            Ok(_) if self.json => {
                self.out.write_all(&json_visible(line))?;
                if !complete {
                    self.out.write_all(b"\n")?;
                }
            }
            Ok(packet) => self.out.write_all(format_packet(&packet).as_bytes())?,
            Err(e) => {
                let torn = if complete {
                    ""
                } else {
                    " (last line, no newline: a torn write?)"
                };
                self.report(format_args!(
                    "{}:{number}: skipped{torn}, not a packet: {e}",
                    file.display()
                ));
            }
        }
        Ok(())
    }

    /// Diagnostics are best effort: a closed stderr must not stop the output.
    /// They name the file and say what serde found wrong with a line, which
    /// can quote it, so they are made [`visible`] too.
    fn report(&mut self, message: std::fmt::Arguments<'_>) {
        let _ = writeln!(self.diag, "{}", visible(&message.to_string()));
    }

    /// Prints a rotated file. A file that cannot be read (removed by a
    /// rotation since it was listed, corrupt) is reported, and the next is read.
    fn rotated_file(&mut self, path: &Path, compressed: bool) -> io::Result<()> {
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) => {
                self.report(format_args!(
                    "{}: skipped, cannot open: {e}",
                    path.display()
                ));
                return Ok(());
            }
        };
        let mut reader: Box<dyn BufRead> = if compressed {
            Box::new(BufReader::new(MultiGzDecoder::new(file)))
        } else {
            Box::new(BufReader::new(file))
        };
        let mut line = Vec::new();
        let mut number = 0;
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) => return Ok(()),
                Ok(_) => {
                    number += 1;
                    self.line(path, number, &line)?;
                }
                Err(e) => {
                    self.report(format_args!(
                        "{}: skipped the rest after line {number}, cannot decompress: {e}",
                        path.display()
                    ));
                    return Ok(());
                }
            }
        }
    }
}

/// The live file being read: where we are in it, and what identifies it, so
/// that a rotation is noticed.
struct Live {
    path: PathBuf,
    file: Option<File>,
    /// Device and inode of `file`: a different one at `path` means the file
    /// was renamed away and a new one created.
    id: (u64, u64),
    /// Bytes read from `file`.
    pos: u64,
    /// Complete lines read from `file`.
    line_no: u64,
    /// The start of a line whose newline has not been read yet.
    partial: Vec<u8>,
    /// The first [`HEAD`] bytes of `file`.
    head: Vec<u8>,
}

impl Live {
    fn new(path: &Path) -> Live {
        Live {
            path: path.to_path_buf(),
            file: None,
            id: (0, 0),
            pos: 0,
            line_no: 0,
            partial: Vec::new(),
            head: Vec::new(),
        }
    }

    /// Opens the file at the path, from its start; none there is not an error
    /// (only rotated files, or between a rename and the new file's creation).
    fn open(&mut self) -> anyhow::Result<()> {
        let cannot = || format!("cannot open {}", self.path.display());
        self.file = match File::open(&self.path) {
            Ok(f) => Some(f),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e).with_context(cannot),
        };
        if let Some(f) = &self.file {
            // The opened file's identity, not the path's: the path may have moved on.
            let meta = f.metadata().with_context(cannot)?;
            self.id = (meta.dev(), meta.ino());
        }
        self.pos = 0;
        self.line_no = 0;
        self.partial.clear();
        self.head.clear();
        Ok(())
    }

    /// Prints every complete line up to the end of the file; a line without
    /// its newline yet is kept for the next read.
    fn read_available(&mut self, printer: &mut Printer<'_>) -> anyhow::Result<()> {
        let mut buf = vec![0; 64 * 1024];
        while let Some(file) = self.file.as_mut() {
            let n = file
                .read(&mut buf)
                .with_context(|| format!("cannot read {}", self.path.display()))?;
            if n == 0 {
                break;
            }
            if self.pos < HEAD as u64 {
                let keep = (HEAD - self.pos as usize).min(n);
                self.head.extend_from_slice(&buf[..keep]);
            }
            self.pos += n as u64;
            let path = self.path.clone();
            self.feed(&path, &buf[..n], printer)?;
        }
        Ok(())
    }

    /// Splits bytes read into lines and prints each complete one.
    fn feed(
        &mut self,
        source: &Path,
        mut bytes: &[u8],
        printer: &mut Printer<'_>,
    ) -> io::Result<()> {
        while let Some(i) = bytes.iter().position(|&b| b == b'\n') {
            self.line_no += 1;
            if self.partial.is_empty() {
                printer.line(source, self.line_no, &bytes[..=i])?;
            } else {
                self.partial.extend_from_slice(&bytes[..=i]);
                printer.line(source, self.line_no, &self.partial)?;
                self.partial.clear();
            }
            bytes = &bytes[i + 1..];
        }
        self.partial.extend_from_slice(bytes);
        Ok(())
    }

    /// The file is done with (the end of a run without `follow`, or a
    /// rotation): a last line without a newline is printed if it is a packet
    /// and reported if not.
    fn finish(&mut self, printer: &mut Printer<'_>) -> io::Result<()> {
        if !self.partial.is_empty() {
            self.line_no += 1;
            let line = std::mem::take(&mut self.partial);
            printer.line(&self.path, self.line_no, &line)?;
        }
        Ok(())
    }

    /// One look at the path while following: reads what was appended, and
    /// notices a rotation either way it is done.
    fn poll(&mut self, printer: &mut Printer<'_>) -> anyhow::Result<()> {
        let meta = match fs::metadata(&self.path) {
            Ok(m) => Some(m),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => {
                return Err(e).with_context(|| format!("cannot stat {}", self.path.display()))
            }
        };
        match meta {
            // Renamed away and not yet re-created: the old file may still grow.
            None => self.read_available(printer),
            // Renamed away and replaced by a new file (or created at last):
            // the old file is read to its end first, then the new from its start.
            Some(m) if self.file.is_none() || (m.dev(), m.ino()) != self.id => {
                self.read_available(printer)?;
                self.finish(printer)?;
                self.open()?;
                self.read_available(printer)
            }
            // Truncated in place (how older versions of `metrics_log`
            // rotated, or `logrotate` with copytruncate): what was appended
            // since the last read is in `PATH.1.gz` now.
            Some(m) if m.len() < self.pos || !self.head_unchanged() => {
                self.catch_up_from_rotation(printer)?;
                self.finish(printer)?;
                self.rewind()?;
                self.read_available(printer)
            }
            Some(_) => self.read_available(printer),
        }
    }

    /// Whether the file still starts as it did when it was read.
    fn head_unchanged(&self) -> bool {
        let Some(file) = &self.file else {
            return true;
        };
        let mut now = vec![0; self.head.len()];
        file.read_exact_at(&mut now, 0).is_ok() && now == self.head
    }

    /// After a truncation: `metrics_log` copied the file to `PATH.1.gz` before
    /// truncating it, so the lines appended between our last read and the
    /// rotation are there, after the `pos` bytes already read. Prints them,
    /// or reports that they are lost (`metrics_log.keep = 0`, or more than one
    /// rotation between two polls).
    fn catch_up_from_rotation(&mut self, printer: &mut Printer<'_>) -> io::Result<()> {
        let rotated = rotated_path(&self.path, 1);
        let mut reader = match File::open(&rotated) {
            Ok(f) => BufReader::new(MultiGzDecoder::new(f)),
            Err(_) => {
                printer.report(format_args!(
                    "{}: rotated; lines appended since the last read may be missing (no {})",
                    self.path.display(),
                    rotated.display()
                ));
                return Ok(());
            }
        };
        let mut head = vec![0; self.head.len()];
        let read_so_far = reader.read_exact(&mut head).and_then(|()| {
            io::copy(
                &mut (&mut reader).take(self.pos - head.len() as u64),
                &mut io::sink(),
            )
        });
        if head != self.head || read_so_far.ok() != Some(self.pos - head.len() as u64) {
            printer.report(format_args!(
                "{}: rotated; lines appended since the last read may be missing ({} is not the file that was read)",
                self.path.display(),
                rotated.display()
            ));
            return Ok(());
        }
        let mut buf = vec![0; 64 * 1024];
        loop {
            match reader.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => self.feed(&rotated, &buf[..n], printer)?,
                Err(e) => {
                    printer.report(format_args!(
                        "{}: skipped the rest, cannot decompress: {e}",
                        rotated.display()
                    ));
                    return Ok(());
                }
            }
        }
    }

    /// Reads the truncated file again from its start.
    fn rewind(&mut self) -> anyhow::Result<()> {
        if let Some(f) = self.file.as_mut() {
            f.seek(SeekFrom::Start(0))
                .with_context(|| format!("cannot read {}", self.path.display()))?;
        }
        self.pos = 0;
        self.line_no = 0;
        self.partial.clear();
        self.head.clear();
        Ok(())
    }
}

/// A packet as a few lines for a person watching a terminal: a header with
/// what the packet covers and its counts, then one line per slice with its
/// most repeated combinations. No colours, so it reads the same in a pipe,
/// a file or a terminal.
///
/// ```text
/// window 2026-11-21 07:51:10–07:51:20 UTC  closed by watermark  valid 7982  invalid 12  late 3  duplicate groups 1205
///   ip          77.164.38.80 ×30, ∅ ×26, 216.123.79.3 ×14, +600 more (603 of 9061 repeat)
///   user_id+ip  60e85ba3…/77.164.38.80 ×30, 133c62b9…/216.123.79.3 ×14, +600 more (602 of 9086 repeat)
/// ```
///
/// The header names the window (end exclusive, UTC) and its pane when the
/// window was split, or for an arrival batch the span of its event times;
/// `duplicate groups` is summed over the slices, a rough size of what
/// repeated. A combination shows the slice's values joined by `/` (`∅` for a
/// missing value, long ones cut with `…`) and its count; `+N more` counts the
/// repeated combinations not shown, including those beyond `analysis.top`.
/// Every text taken from the packet is shown [`visible`].
pub fn format_packet(packet: &Packet) -> String {
    let w = &packet.window;
    let mut s = String::new();
    match (&w.start, &w.end) {
        (Some(start), Some(end)) => {
            s.push_str("window ");
            s.push_str(&span(start, end));
            // Pane 0 of a window that was not split is the whole window.
            if let Some(pane) = w.pane.filter(|&n| n > 0 || w.closed_by == "count") {
                let _ = write!(s, " pane {pane}");
            }
        }
        _ => {
            s.push_str("batch ");
            match (&w.ts_min, &w.ts_max) {
                (Some(min), Some(max)) => s.push_str(&span(min, max)),
                _ => s.push_str("(no event time)"),
            }
        }
    }
    let e = &packet.events;
    let _ = write!(
        s,
        "  closed by {}  valid {}  invalid {}",
        visible(&w.closed_by),
        e.valid,
        e.invalid
    );
    if let Some(late) = e.late {
        let _ = write!(s, "  late {late}");
    }
    let duplicate_groups: u64 = packet.metrics.iter().map(|m| m.duplicate_groups).sum();
    let _ = writeln!(s, "  duplicate groups {duplicate_groups}");

    let names: Vec<String> = packet
        .metrics
        .iter()
        .map(|m| visible(&m.slice.join("+")).into_owned())
        .collect();
    let width = names.iter().map(|n| n.chars().count()).max().unwrap_or(0);
    for (m, name) in packet.metrics.iter().zip(&names) {
        let _ = writeln!(s, "  {name:<width$}  {}", slice_summary(m));
    }
    s
}

/// `a ×7, b ×5, c ×4, +12 more (15 of 230 repeat)`, or `no repeats (230 groups)`.
fn slice_summary(m: &SliceMetrics) -> String {
    if m.duplicate_groups == 0 && m.duplicates.is_empty() {
        return format!("no repeats ({} groups)", m.groups);
    }
    let mut parts: Vec<String> = m
        .duplicates
        .iter()
        .take(TOP_SHOWN)
        .map(|row| combination(&m.slice, row))
        .collect();
    let more = m.duplicate_groups.saturating_sub(parts.len() as u64);
    if more > 0 {
        parts.push(format!("+{more} more"));
    }
    format!(
        "{} ({} of {} repeat)",
        parts.join(", "),
        m.duplicate_groups,
        m.groups
    )
}

/// One duplicate row: the slice's values in slice order, and its count.
fn combination(slice: &[String], row: &Map<String, Value>) -> String {
    let values: Vec<String> = slice
        .iter()
        .map(|field| match row.get(field) {
            Some(Value::String(v)) => shorten(v),
            None | Some(Value::Null) => "∅".to_string(),
            Some(other) => shorten(&other.to_string()),
        })
        .collect();
    let count = row.get("count").map(Value::to_string).unwrap_or_default();
    let count = visible(&count);
    format!("{} ×{count}", values.join("/"))
}

/// The value cut when long, then made [`visible`]: cut first, so that the
/// length counts the value's own characters and no escape is cut in half.
fn shorten(v: &str) -> String {
    if v.chars().count() <= LONG_VALUE {
        visible(v).into_owned()
    } else {
        let mut cut: String = v.chars().take(CUT_TO).collect();
        cut = visible(&cut).into_owned();
        cut.push('…');
        cut
    }
}

/// `2026-11-21 07:51:10–07:51:20 UTC`: one date when both ends share it,
/// milliseconds only when either end has some. Timestamps that are not RFC
/// 3339 are shown as they are, made [`visible`].
fn span(from: &str, to: &str) -> String {
    let parse = |t: &str| DateTime::parse_from_rfc3339(t).map(|d| d.with_timezone(&Utc));
    let (Ok(a), Ok(b)) = (parse(from), parse(to)) else {
        return format!("{}–{}", visible(from), visible(to));
    };
    let time = if a.timestamp_subsec_millis() != 0 || b.timestamp_subsec_millis() != 0 {
        "%H:%M:%S%.3f"
    } else {
        "%H:%M:%S"
    };
    let end = if a.date_naive() == b.date_naive() {
        b.format(time).to_string()
    } else {
        format!("{} {}", b.format("%Y-%m-%d"), b.format(time))
    };
    format!("{} {}–{end} UTC", a.format("%Y-%m-%d"), a.format(time))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::packet::{EventCounts, Source, Window};
    use serde_json::json;
    use std::collections::BTreeMap;

    fn row(values: Value) -> Map<String, Value> {
        values.as_object().expect("an object").clone()
    }

    fn slice(
        fields: &[&str],
        groups: u64,
        duplicate_groups: u64,
        rows: Vec<Value>,
    ) -> SliceMetrics {
        SliceMetrics {
            slice: fields.iter().map(|f| f.to_string()).collect(),
            groups,
            duplicate_groups,
            truncated: (rows.len() as u64) < duplicate_groups,
            duplicates: rows.into_iter().map(row).collect(),
        }
    }

    fn window_packet() -> Packet {
        Packet {
            schema_version: 2,
            packet_id: "0123456789abcdef0123456789abcdef".into(),
            window: Window {
                start: Some("2026-11-21T07:51:10.000Z".into()),
                end: Some("2026-11-21T07:51:20.000Z".into()),
                pane: Some(0),
                ts_min: Some("2026-11-21T07:51:10.004Z".into()),
                ts_max: Some("2026-11-21T07:51:19.998Z".into()),
                closed_by: "watermark".into(),
            },
            events: EventCounts {
                valid: 7982,
                invalid: 12,
                invalid_by_kind: BTreeMap::from([("not_json".to_string(), 12)]),
                late: Some(3),
            },
            sources: vec![Source {
                topic: "user-login".into(),
                partition: 0,
                first_offset: 100,
                last_offset: 8096,
            }],
            metrics: vec![
                slice(
                    &["ip"],
                    9061,
                    603,
                    vec![
                        json!({"ip": "77.164.38.80", "count": 30}),
                        json!({"ip": null, "count": 26}),
                        json!({"ip": "216.123.79.3", "count": 14}),
                        json!({"ip": "10.0.0.1", "count": 9}),
                    ],
                ),
                slice(
                    &["user_id", "ip"],
                    9086,
                    2,
                    vec![
                        json!({"user_id": "60e85ba3-81c2-06f7-8956-06283d13ec83", "ip": "77.164.38.80", "count": 30}),
                        json!({"user_id": "u9", "ip": null, "count": 5}),
                    ],
                ),
                slice(&["locale", "device_type"], 36, 0, vec![]),
            ],
            emitted_at: "2026-11-21T07:51:26.120Z".into(),
        }
    }

    #[test]
    fn a_window_packet_reads_as_a_header_and_a_line_per_slice() {
        assert_eq!(
            format_packet(&window_packet()),
            "window 2026-11-21 07:51:10–07:51:20 UTC  closed by watermark  valid 7982  invalid 12  late 3  duplicate groups 605\n\
             \x20 ip                  77.164.38.80 ×30, ∅ ×26, 216.123.79.3 ×14, +600 more (603 of 9061 repeat)\n\
             \x20 user_id+ip          60e85ba3…/77.164.38.80 ×30, u9/∅ ×5 (2 of 9086 repeat)\n\
             \x20 locale+device_type  no repeats (36 groups)\n"
        );
    }

    #[test]
    fn more_counts_the_repeats_beyond_the_packets_own_top() {
        // The packet lists 4 of its 603 repeated combinations (analysis.top):
        // 3 are shown and the other 600 counted.
        let p = window_packet();
        let line = slice_summary(&p.metrics[0]);
        assert!(line.ends_with(", +600 more (603 of 9061 repeat)"), "{line}");
        let mut m = p.metrics[0].clone();
        m.duplicate_groups = 3;
        m.duplicates.truncate(3);
        assert_eq!(
            slice_summary(&m),
            "77.164.38.80 ×30, ∅ ×26, 216.123.79.3 ×14 (3 of 9061 repeat)"
        );
        m.duplicates.clear();
        assert_eq!(slice_summary(&m), "+3 more (3 of 9061 repeat)");
    }

    #[test]
    fn the_pane_is_shown_only_for_a_split_window() {
        let mut p = window_packet();
        let header = |p: &Packet| format_packet(p).lines().next().unwrap().to_string();
        assert!(!header(&p).contains("pane"));
        p.window.closed_by = "count".into();
        assert!(
            header(&p)
                .starts_with("window 2026-11-21 07:51:10–07:51:20 UTC pane 0  closed by count"),
            "{}",
            header(&p)
        );
        p.window.pane = Some(2);
        p.window.closed_by = "watermark".into();
        assert!(header(&p).contains("07:51:20 UTC pane 2  closed by watermark"));
    }

    #[test]
    fn an_arrival_batch_shows_its_event_times_and_no_late_count() {
        let mut p = window_packet();
        p.window.start = None;
        p.window.end = None;
        p.window.pane = None;
        p.window.closed_by = "count".into();
        p.events.late = None;
        p.window.ts_max = Some("2026-11-22T00:00:01.250Z".into());
        let text = format_packet(&p);
        assert!(
            text.starts_with(
                "batch 2026-11-21 07:51:10.004–2026-11-22 00:00:01.250 UTC  closed by count  valid 7982  invalid 12  duplicate groups 605\n"
            ),
            "{text}"
        );
        p.window.ts_min = None;
        p.window.ts_max = None;
        p.events.valid = 0;
        p.metrics.clear();
        assert_eq!(
            format_packet(&p),
            "batch (no event time)  closed by count  valid 0  invalid 12  duplicate groups 0\n"
        );
    }

    #[test]
    fn long_values_are_cut_and_short_ones_kept() {
        assert_eq!(shorten("255.255.255.255"), "255.255.255.255");
        assert_eq!(shorten("3.0.0-beta"), "3.0.0-beta");
        assert_eq!(shorten("5bdcc146bf60754e6a042426089575c7"), "5bdcc146…");
        assert_eq!(shorten("ééééééééééééééééé"), "éééééééé…");
    }

    /// Producer-controlled text as it arrives in packet values: an OSC that
    /// retitles the terminal, a screen clear, the one-byte C1 CSI, DEL, a
    /// right-to-left override, a bidi isolate and a carriage return.
    const HOSTILE: &str = "a\u{1b}]0;pwned\u{7}b\u{1b}[2Jc\u{9b}31md\u{7f}e\u{202e}f\u{2067}g\rh";

    fn assert_shows_no_hidden_character(text: &str) {
        let found: Vec<char> = text
            .chars()
            .filter(|&c| is_hidden(c) && c != '\n')
            .collect();
        assert!(found.is_empty(), "{found:?} in {text:?}");
    }

    #[test]
    fn hidden_characters_are_escaped_and_the_rest_kept() {
        assert_eq!(
            visible(HOSTILE),
            "a\\u{1b}]0;pwned\\u{7}b\\u{1b}[2Jc\\u{9b}31md\\u{7f}e\\u{202e}f\\u{2067}g\\u{d}h"
        );
        for c in [
            '\u{0}', '\t', '\n', '\u{80}', '\u{85}', '\u{9f}', '\u{61c}', '\u{200e}', '\u{200f}',
            '\u{2028}', '\u{2029}', '\u{202a}', '\u{2066}', '\u{2069}',
        ] {
            assert!(is_hidden(c), "{c:?}");
        }
        // Printable text, ASCII or not, is left as it is (and not copied).
        let plain = "77.164.38.80 2.3.0/DE ∅ ééé 東京 \u{a0}\u{200d} x\\u{1b}";
        assert!(matches!(visible(plain), Cow::Borrowed(p) if p == plain));
    }

    #[test]
    fn a_packet_from_a_hostile_producer_shows_its_values_escaped() {
        let mut p = window_packet();
        // A long value, cut to 8 characters before it is escaped; short ones whole.
        p.metrics[0].duplicates[0].insert("ip".into(), Value::String(HOSTILE.into()));
        p.metrics[1].duplicates[1].insert("user_id".into(), Value::String("\u{1b}[2J".into()));
        p.metrics[1].duplicates[0].insert("ip".into(), json!(["\u{9b}1m"]));
        p.metrics[2].slice[0] = "locale\u{1b}[8m".into();
        p.window.closed_by = "watermark\u{1b}]0;x\u{7}".into();
        let text = format_packet(&p);
        assert_shows_no_hidden_character(&text);
        assert!(
            text.contains("closed by watermark\\u{1b}]0;x\\u{7}  valid"),
            "{text}"
        );
        assert!(text.contains(" a\\u{1b}]0;pwn… ×30"), "{text}");
        assert!(text.contains("\\u{1b}[2J/∅ ×5"), "{text}");
        assert!(text.contains("[\"\\u{9b}1m\"] ×30"), "{text}");
        assert!(
            text.contains("  locale\\u{1b}[8m+device_type  no repeats"),
            "{text}"
        );

        // Event times that are not RFC 3339 are shown as they are: escaped.
        p.window.start = None;
        p.window.end = None;
        p.window.ts_min = Some("\u{202e}0202".into());
        p.window.ts_max = Some(HOSTILE.into());
        let header = format_packet(&p).lines().next().unwrap().to_string();
        assert_shows_no_hidden_character(&header);
        assert!(
            header.starts_with("batch \\u{202e}0202–a\\u{1b}]0;pwned"),
            "{header}"
        );
    }

    #[test]
    fn json_lines_carry_hidden_characters_as_json_escapes_of_the_same_value() {
        let mut p = window_packet();
        p.metrics[0].duplicates[0].insert("ip".into(), Value::String(HOSTILE.into()));
        p.window.closed_by = "\u{85}".into();
        let raw = p.to_json() + "\n";
        // serde_json escapes the C0 controls itself, not DEL, C1 or bidi.
        assert!(raw.contains("\\u001b") && raw.contains('\u{9b}') && raw.contains('\u{202e}'));
        let shown = String::from_utf8(json_visible(raw.as_bytes()).into_owned()).unwrap();
        assert_shows_no_hidden_character(&shown);
        assert!(shown.ends_with("}\n"));
        assert!(
            shown.contains("c\\u009b31md\\u007fe\\u202ef\\u2067g"),
            "{shown}"
        );
        assert_eq!(serde_json::from_str::<Packet>(&shown).unwrap(), p);

        // A line with nothing to escape is passed through as it is.
        let clean = line('a');
        assert!(
            matches!(json_visible(clean.as_bytes()), Cow::Borrowed(b) if b == clean.as_bytes())
        );

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.log");
        fs::write(&path, raw).unwrap();
        let (mut out, mut diag) = (Vec::new(), Vec::new());
        let options = Options {
            json: true,
            follow: false,
        };
        tail(
            &path,
            options,
            &mut out,
            &mut diag,
            &CancellationToken::new(),
        )
        .unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), shown);
    }

    #[test]
    fn diagnostics_show_what_they_quote_escaped() {
        let (mut out, mut diag) = (Vec::new(), Vec::new());
        let mut printer = Printer {
            json: false,
            out: &mut out,
            diag: &mut diag,
        };
        // The file's name and the line's content, as serde quotes it.
        printer
            .line(
                Path::new("m\u{1b}]0;x\u{7}.log"),
                3,
                b"{\"schema_version\":\"\\u009b2J\"}\n",
            )
            .unwrap();
        printer.report(format_args!("quoted: {HOSTILE}"));
        let diag = String::from_utf8(diag).unwrap();
        assert_shows_no_hidden_character(&diag);
        assert!(
            diag.starts_with(
                "m\\u{1b}]0;x\\u{7}.log:3: skipped, not a packet: invalid type: string \"\\u{9b}2J\""
            ),
            "{diag}"
        );
        assert!(
            diag.ends_with(&format!("quoted: {}\n", visible(HOSTILE))),
            "{diag}"
        );
        assert!(out.is_empty());
    }

    /// A packet line with its own id.
    fn line(id: char) -> String {
        let mut p = window_packet();
        p.packet_id = id.to_string().repeat(32);
        p.to_json() + "\n"
    }

    #[test]
    fn a_rotation_not_yet_compressed_is_read_between_the_gz_files_and_the_live_file() {
        use flate2::write::GzEncoder;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.log");
        let mut gz = GzEncoder::new(
            File::create(rotated_path(&path, 2)).unwrap(),
            flate2::Compression::default(),
        );
        gz.write_all(line('a').as_bytes()).unwrap();
        gz.finish().unwrap();
        fs::write(pending_path(&path), line('b')).unwrap();
        fs::write(&path, line('c')).unwrap();
        let (mut out, mut diag) = (Vec::new(), Vec::new());
        let options = Options {
            json: true,
            follow: false,
        };
        tail(
            &path,
            options,
            &mut out,
            &mut diag,
            &CancellationToken::new(),
        )
        .unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            [line('a'), line('b'), line('c')].concat()
        );
        assert!(diag.is_empty());
    }

    #[test]
    fn a_line_is_printed_once_its_newline_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.log");
        let (a, b) = (line('a'), line('b'));
        fs::write(&path, format!("{a}{}", &b[..100])).unwrap();
        let (mut out, mut diag) = (Vec::new(), Vec::new());
        let mut printer = Printer {
            json: true,
            out: &mut out,
            diag: &mut diag,
        };
        let mut live = Live::new(&path);
        live.open().unwrap();
        live.read_available(&mut printer).unwrap();
        live.poll(&mut printer).unwrap();
        // Held, not printed nor reported, until the rest of the line arrives.
        assert_eq!((live.line_no, live.partial.len()), (1, 100));
        fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(&b.as_bytes()[100..])
            .unwrap();
        live.poll(&mut printer).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), a + &b);
        assert!(diag.is_empty());
    }

    #[test]
    fn a_file_truncated_and_written_past_its_old_size_is_read_again_from_the_top() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.log");
        fs::write(&path, line('a') + &line('b')).unwrap();
        let (mut out, mut diag) = (Vec::new(), Vec::new());
        let mut printer = Printer {
            json: true,
            out: &mut out,
            diag: &mut diag,
        };
        let mut live = Live::new(&path);
        live.open().unwrap();
        live.read_available(&mut printer).unwrap();
        // Between two polls: truncated in place (same inode) and written again,
        // longer than before, so only its start tells.
        fs::write(&path, line('c') + &line('d') + &line('e')).unwrap();
        live.poll(&mut printer).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            [line('a'), line('b'), line('c'), line('d'), line('e')].concat()
        );
        // No m.log.1.gz to take the missed lines from: said so.
        let diag = String::from_utf8(diag).unwrap();
        assert!(diag.contains("may be missing"), "{diag}");
    }

    #[test]
    fn rotated_files_are_listed_oldest_first_without_the_one_being_written() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("m.log");
        for name in [
            "m.log",
            "m.log.1.gz",
            "m.log.10.gz",
            "m.log.2.gz",
            "m.log.0.gz",
            "m.log.01.gz",
            "m.log.x.gz",
            "other.log.3.gz",
        ] {
            fs::write(dir.path().join(name), "").unwrap();
        }
        let names: Vec<String> = rotated_files(&log)
            .unwrap()
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["m.log.10.gz", "m.log.2.gz", "m.log.1.gz"]);
    }
}
