//! The repository write lock: an exclusive `flock` on `lock`, holding a line
//! that names the holder so a waiting process can say who it waits for.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fs4::fs_std::FileExt;

use crate::error::{Error, Result};

/// Name of the lock file inside the repository directory.
pub const LOCK_FILE: &str = "lock";

/// A held write lock; released on drop.
#[derive(Debug)]
pub struct WriteLock {
    file: File,
    path: PathBuf,
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl WriteLock {
    /// Takes the lock, waiting up to `timeout`. `holder` describes this
    /// process (command and pid) for other waiters.
    pub fn acquire(dir: &Path, timeout: Duration, holder: &str) -> Result<WriteLock> {
        let path = dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::io("open", &path, e))?;
        let start = Instant::now();
        let mut pause = Duration::from_millis(2);
        loop {
            match FileExt::try_lock_exclusive(&file) {
                Ok(true) => break,
                Ok(false) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(Error::io("lock", &path, e)),
            }
            if start.elapsed() >= timeout {
                let mut text = String::new();
                let _ = file.seek(SeekFrom::Start(0));
                let _ = file.read_to_string(&mut text);
                let text = text.trim();
                let holder = if text.is_empty() {
                    "another process".to_string()
                } else {
                    text.to_string()
                };
                return Err(Error::LockTimeout {
                    holder,
                    waited_ms: start.elapsed().as_millis() as u64,
                });
            }
            // Back off: the lock is held for the length of one commit.
            std::thread::sleep(pause.min(timeout.saturating_sub(start.elapsed())));
            pause = (pause * 2).min(Duration::from_millis(50));
        }
        let line = format!(
            "{holder} (pid {}, since unix time {})\n",
            std::process::id(),
            now_secs()
        );
        let _ = file.set_len(0);
        let _ = file.seek(SeekFrom::Start(0));
        let _ = file.write_all(line.as_bytes());
        Ok(WriteLock { file, path })
    }

    /// The lock file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for WriteLock {
    fn drop(&mut self) {
        let _ = self.file.set_len(0);
        let _ = FileExt::unlock(&self.file);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_taker_times_out_naming_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let held =
            WriteLock::acquire(dir.path(), Duration::from_millis(10), "dsv test-holder").unwrap();
        let err = WriteLock::acquire(dir.path(), Duration::from_millis(30), "other").unwrap_err();
        match err {
            Error::LockTimeout { holder, .. } => {
                assert!(holder.contains("dsv test-holder"), "{holder}")
            }
            other => panic!("unexpected {other:?}"),
        }
        drop(held);
        WriteLock::acquire(dir.path(), Duration::from_millis(10), "other").unwrap();
    }
}
