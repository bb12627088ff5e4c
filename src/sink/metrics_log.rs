//! The local metrics log: one packet per line, for `tail -F`.
//!
//! Each packet is appended as one line and flushed to disk (`sync_data`)
//! before the batch's offsets are committed, so a committed batch is always in
//! the file. A failed append is cut back to the last whole line.
//!
//! Rotation never loses a committed line: when the next line would take the
//! file past `max_bytes`, older rotations shift (`PATH.1.gz` to `PATH.2.gz`,
//! ..., keeping `keep`), the file is renamed to `PATH.0` and a new `PATH` is
//! created, both renames made durable by syncing the directory. `PATH.0` is
//! then compressed to `PATH.1.gz` on a thread of its own, off the hot path,
//! and removed only once the compressed copy is synced and renamed into
//! place. A crash at any point leaves every line in `PATH`, `PATH.0` or a
//! `.gz` file; opening the log finishes an interrupted compression.
//!
//! Opening also repairs a torn last line (a crash in the middle of an append:
//! that packet's offsets were never committed, so it is written again) and
//! takes an exclusive lock on `PATH.lock`, so two processes never write one
//! log file.

use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use flate2::write::GzEncoder;
use flate2::Compression;
use tracing::warn;

pub struct MetricsLog {
    path: PathBuf,
    max_bytes: u64,
    keep: usize,
    file: File,
    size: u64,
    /// A write failed: reopen the path before the next one (the file may have
    /// been replaced, or the failure may have left the handle unusable).
    reopen: bool,
    /// Held for the life of the log: one writer per file.
    _lock: File,
    compressing: Option<JoinHandle<io::Result<()>>>,
}

/// `PATH` with `suffix` appended to its file name.
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_os_string();
    name.push(suffix);
    PathBuf::from(name)
}

/// The `n`-th rotated file, `PATH.n.gz`.
pub fn rotated_path(path: &Path, n: usize) -> PathBuf {
    with_suffix(path, &format!(".{n}.gz"))
}

/// The file renamed away by a rotation and not yet compressed, `PATH.0`.
pub fn pending_path(path: &Path) -> PathBuf {
    with_suffix(path, ".0")
}

fn sync_dir(path: &Path) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

/// Compresses `PATH.0` to `PATH.1.gz` (through a synced temporary file and a
/// rename), then removes `PATH.0`.
fn compress_pending(path: &Path) -> io::Result<()> {
    let pending = pending_path(path);
    let target = rotated_path(path, 1);
    if target.exists() {
        // The compressed copy was renamed into place before a crash: only
        // the removal of PATH.0 was left to do.
        fs::remove_file(&pending)?;
        return sync_dir(path);
    }
    let tmp = with_suffix(path, ".1.gz.tmp");
    {
        let mut src = BufReader::new(File::open(&pending)?);
        let mut gz = GzEncoder::new(File::create(&tmp)?, Compression::default());
        io::copy(&mut src, &mut gz)?;
        gz.finish()?.sync_all()?;
    }
    fs::rename(&tmp, &target)?;
    sync_dir(path)?;
    fs::remove_file(&pending)?;
    sync_dir(path)
}

/// Cuts a torn last line (no final newline) off the file; returns the bytes cut.
fn repair_torn_tail(path: &Path) -> io::Result<u64> {
    let mut f = match OpenOptions::new().read(true).write(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len();
    if len == 0 {
        return Ok(0);
    }
    let mut end = len;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let start = end.saturating_sub(buf.len() as u64);
        let chunk = &mut buf[..(end - start) as usize];
        f.seek(SeekFrom::Start(start))?;
        f.read_exact(chunk)?;
        if end == len && chunk.last() == Some(&b'\n') {
            return Ok(0);
        }
        if let Some(i) = chunk.iter().rposition(|b| *b == b'\n') {
            let keep = start + i as u64 + 1;
            f.set_len(keep)?;
            f.sync_all()?;
            return Ok(len - keep);
        }
        if start == 0 {
            f.set_len(0)?;
            f.sync_all()?;
            return Ok(len);
        }
        end = start;
    }
}

impl MetricsLog {
    pub fn open(path: &Path, max_bytes: u64, keep: usize) -> io::Result<MetricsLog> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir)?;
        }
        let lock_path = with_suffix(path, ".lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    format!(
                        "another process writes this metrics log (it holds {}); give each instance its own metrics_log.path",
                        lock_path.display()
                    ),
                ))
            }
            Err(TryLockError::Error(e)) => return Err(e),
        }
        let cut = repair_torn_tail(path)?;
        if cut > 0 {
            warn!(path = %path.display(), bytes = cut, "cut a torn last line off the metrics log (its packet was not committed and is written again)");
        }
        if pending_path(path).exists() {
            compress_pending(path)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let size = file.metadata()?.len();
        Ok(MetricsLog {
            path: path.to_path_buf(),
            max_bytes,
            keep,
            file,
            size,
            reopen: false,
            _lock: lock,
            compressing: None,
        })
    }

    /// Appends one line (a newline is added) and syncs it to disk. On failure
    /// (a full disk, say) the file is cut back to its last whole line, so the
    /// caller can simply try the same line again later.
    pub fn append(&mut self, line: &str) -> io::Result<()> {
        if self.reopen {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)?;
            self.size = file.metadata()?.len();
            self.file = file;
            self.reopen = false;
        }
        let result = self.write_line(line);
        if result.is_err() {
            // Best effort: a torn line must not be glued to the next one.
            let _ = self.file.set_len(self.size);
            self.reopen = true;
        }
        result
    }

    fn write_line(&mut self, line: &str) -> io::Result<()> {
        let len = line.len() as u64 + 1;
        if self.size > 0 && self.size + len > self.max_bytes {
            self.rotate()?;
        }
        let mut buf = Vec::with_capacity(line.len() + 1);
        buf.extend_from_slice(line.as_bytes());
        buf.push(b'\n');
        self.file.write_all(&buf)?;
        self.file.sync_data()?;
        self.size += len;
        Ok(())
    }

    /// The packet ids of the lines the log ends with, within its last
    /// `bytes` bytes; when the file holds less, the newest rotated file's
    /// too, so that lines written on both sides of a rotation are found.
    /// Exactly once, recovery compares them with what the last transaction
    /// committed.
    pub fn last_packet_ids(&self, bytes: u64) -> io::Result<std::collections::HashSet<String>> {
        let mut text = Vec::new();
        if self.size < bytes {
            let pending = pending_path(&self.path);
            if pending.exists() {
                File::open(&pending)?.read_to_end(&mut text)?;
            } else if let Ok(f) = File::open(rotated_path(&self.path, 1)) {
                flate2::read::GzDecoder::new(f).read_to_end(&mut text)?;
            }
        }
        let mut f = File::open(&self.path)?;
        let start = self.size.saturating_sub(bytes);
        f.seek(SeekFrom::Start(start))?;
        f.read_to_end(&mut text)?;
        Ok(text
            .split(|b| *b == b'\n')
            .filter_map(|line| serde_json::from_slice::<serde_json::Value>(line).ok())
            .filter_map(|v| v.get("packet_id")?.as_str().map(str::to_string))
            .collect())
    }

    #[cfg(test)]
    fn rotated(&self, n: usize) -> PathBuf {
        rotated_path(&self.path, n)
    }

    /// Waits for a compression in progress, reporting its failure.
    pub fn settle(&mut self) -> io::Result<()> {
        match self.compressing.take() {
            Some(h) => h
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("the compression thread panicked"))),
            None => Ok(()),
        }
    }

    fn rotate(&mut self) -> io::Result<()> {
        if let Err(e) = self.settle() {
            // PATH.0 is still there; the next open finishes it.
            warn!(error = %e, "compressing a rotated metrics log failed");
        }
        if pending_path(&self.path).exists() {
            compress_pending(&self.path)?;
        }
        self.file.sync_all()?;
        if self.keep > 0 {
            let _ = fs::remove_file(rotated_path(&self.path, self.keep));
            for n in (1..self.keep).rev() {
                let from = rotated_path(&self.path, n);
                if from.exists() {
                    fs::rename(&from, rotated_path(&self.path, n + 1))?;
                }
            }
            fs::rename(&self.path, pending_path(&self.path))?;
        } else {
            fs::remove_file(&self.path)?;
        }
        self.file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        self.size = 0;
        sync_dir(&self.path)?;
        if self.keep > 0 {
            let path = self.path.clone();
            self.compressing = Some(std::thread::spawn(move || compress_pending(&path)));
        }
        Ok(())
    }
}

impl Drop for MetricsLog {
    fn drop(&mut self) {
        if let Err(e) = self.settle() {
            warn!(error = %e, "compressing a rotated metrics log failed; the next start finishes it");
        }
    }
}

/// `[metrics_log]`: the local packet log and its rotation.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsLogSettings {
    /// `None` when the metrics log is disabled.
    #[serde(with = "crate::values::optional")]
    pub path: Option<PathBuf>,
    pub max_bytes: u64,
    pub keep: usize,
}

/// The most rotated files kept.
const MAX_KEEP: u64 = 1000;

impl MetricsLogSettings {
    /// Replaces `{host}` in the path with `host`: instances started from
    /// one configuration on several hosts or containers (`docker compose up
    /// --scale`) each get a metrics log of their own.
    pub fn expand_host(&mut self, host: &str) {
        if let Some(p) = &self.path {
            let text = p.to_string_lossy();
            if text.contains("{host}") {
                self.path = Some(PathBuf::from(text.replace("{host}", host)));
            }
        }
    }

    pub fn check(&self, f: &mut crate::values::Findings) {
        let max = crate::values::MAX_INT;
        f.bounded("metrics_log.max_bytes", self.max_bytes, 1, max);
        f.bounded("metrics_log.keep", self.keep as u64, 0, MAX_KEEP);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::read::GzDecoder;
    use std::io::Read;

    fn gunzip(path: &Path) -> String {
        let mut s = String::new();
        GzDecoder::new(File::open(path).unwrap())
            .read_to_string(&mut s)
            .unwrap();
        s
    }

    #[test]
    fn appends_lines_and_rotates_with_gzip_keeping_n() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/metrics.log");
        let mut log = MetricsLog::open(&path, 25, 2).unwrap();
        for i in 0..5 {
            log.append(&format!("packet-number-{i}")).unwrap(); // 17 bytes a line
        }
        log.settle().unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "packet-number-4\n");
        assert_eq!(gunzip(&log.rotated(1)), "packet-number-3\n");
        assert_eq!(gunzip(&log.rotated(2)), "packet-number-2\n");
        assert!(!log.rotated(3).exists());
        assert!(!pending_path(&path).exists());
    }

    #[test]
    fn opening_repairs_a_torn_last_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.log");
        fs::write(&path, "{\"a\":1}\n{\"b\":").unwrap();
        MetricsLog::open(&path, 1000, 1)
            .unwrap()
            .append("{\"b\":2}")
            .unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "{\"a\":1}\n{\"b\":2}\n");
        fs::write(&path, "torn").unwrap();
        drop(MetricsLog::open(&path, 1000, 1).unwrap());
        assert_eq!(fs::read_to_string(&path).unwrap(), "");
    }

    #[test]
    fn a_second_writer_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.log");
        let first = MetricsLog::open(&path, 1000, 1).unwrap();
        let err = MetricsLog::open(&path, 1000, 1).err().expect("refused");
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        assert!(err.to_string().contains("m.log.lock"), "{err}");
        drop(first);
        MetricsLog::open(&path, 1000, 1).expect("free again");
    }

    #[test]
    fn opening_finishes_a_compression_a_crash_interrupted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.log");
        // Renamed away, not compressed yet.
        fs::write(pending_path(&path), "old\n").unwrap();
        drop(MetricsLog::open(&path, 1000, 2).unwrap());
        assert_eq!(gunzip(&rotated_path(&path, 1)), "old\n");
        assert!(!pending_path(&path).exists());
        // Compressed and renamed into place, PATH.0 not yet removed.
        fs::write(pending_path(&path), "old\n").unwrap();
        drop(MetricsLog::open(&path, 1000, 2).unwrap());
        assert_eq!(gunzip(&rotated_path(&path, 1)), "old\n");
        assert!(!pending_path(&path).exists());
    }

    #[test]
    fn reopening_continues_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.log");
        MetricsLog::open(&path, 1000, 1)
            .unwrap()
            .append("a")
            .unwrap();
        MetricsLog::open(&path, 1000, 1)
            .unwrap()
            .append("b")
            .unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "a\nb\n");
    }

    #[test]
    fn a_failed_append_leaves_no_torn_line_and_the_next_attempt_reopens_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.log");
        std::os::unix::fs::symlink("/dev/full", &path).unwrap();
        let mut log = MetricsLog::open(&path, 1 << 20, 2).unwrap();
        assert!(log.append("{\"a\":1}").is_err(), "no space on /dev/full");
        fs::remove_file(&path).unwrap();
        log.append("{\"a\":1}").unwrap();
        log.append("{\"b\":2}").unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "{\"a\":1}\n{\"b\":2}\n");
    }

    #[test]
    fn keep_zero_discards_rotated_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.log");
        let mut log = MetricsLog::open(&path, 4, 0).unwrap();
        log.append("abc").unwrap();
        log.append("def").unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "def\n");
        let mut names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, vec!["m.log", "m.log.lock"]);
    }
}
