//! The local metrics log: one packet per line, for `tail -f`.
//!
//! Each packet is appended as one line and flushed to disk (`sync_data`)
//! before the batch's offsets are committed, so a committed batch is always in
//! the file. When the next line would take the file past `max_bytes`, the
//! file is rotated: it is gzip-compressed to `PATH.1.gz`, older rotations
//! shift to `PATH.2.gz`, ..., and only `keep` of them are kept. Rotation
//! writes the compressed copy before removing the original, so a crash
//! during rotation leaves at worst a duplicate, never a gap.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Write};
use std::path::{Path, PathBuf};

use flate2::write::GzEncoder;
use flate2::Compression;

/// The name of the `n`th rotation of the log at `path`: `PATH.n.gz`, 1 the
/// newest. `PATH.0.gz` is the rotation being written, a copy of `PATH` that
/// readers must skip. Shared with [`crate::tail`], which reads the rotations back.
pub fn rotated_path(path: &Path, n: usize) -> PathBuf {
    let mut name = path.as_os_str().to_os_string();
    name.push(format!(".{n}.gz"));
    PathBuf::from(name)
}

pub struct MetricsLog {
    path: PathBuf,
    max_bytes: u64,
    keep: usize,
    file: File,
    size: u64,
}

impl MetricsLog {
    pub fn open(path: &Path, max_bytes: u64, keep: usize) -> io::Result<MetricsLog> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let size = file.metadata()?.len();
        Ok(MetricsLog {
            path: path.to_path_buf(),
            max_bytes,
            keep,
            file,
            size,
        })
    }

    /// Appends one line (a newline is added) and syncs it to disk.
    pub fn append(&mut self, line: &str) -> io::Result<()> {
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

    fn rotated(&self, n: usize) -> PathBuf {
        rotated_path(&self.path, n)
    }

    fn rotate(&mut self) -> io::Result<()> {
        if self.keep > 0 {
            let _ = fs::remove_file(self.rotated(self.keep));
            for n in (1..self.keep).rev() {
                let from = self.rotated(n);
                if from.exists() {
                    fs::rename(&from, self.rotated(n + 1))?;
                }
            }
            let tmp = self.rotated(0);
            {
                let mut src = BufReader::new(File::open(&self.path)?);
                let mut gz = GzEncoder::new(File::create(&tmp)?, Compression::default());
                io::copy(&mut src, &mut gz)?;
                gz.finish()?.sync_all()?;
            }
            fs::rename(&tmp, self.rotated(1))?;
        }
        // Truncate in place rather than re-create, so `tail -F` and open handles follow.
        self.file.set_len(0)?;
        self.size = 0;
        Ok(())
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
        assert_eq!(fs::read_to_string(&path).unwrap(), "packet-number-4\n");
        assert_eq!(gunzip(&log.rotated(1)), "packet-number-3\n");
        assert_eq!(gunzip(&log.rotated(2)), "packet-number-2\n");
        assert!(!log.rotated(3).exists());
        assert!(!log.rotated(0).exists());
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
    fn keep_zero_discards_rotated_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.log");
        let mut log = MetricsLog::open(&path, 4, 0).unwrap();
        log.append("abc").unwrap();
        log.append("def").unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "def\n");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
