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
    abandoned_since: Option<u64>,
}

/// A holder line split around its `since unix time N`: the text before
/// it, N, and the text after it.
fn split_since(line: &str) -> Option<(&str, u64, &str)> {
    const MARK: &str = "since unix time ";
    let at = line.find(MARK)?;
    let rest = &line[at + MARK.len()..];
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    let since = rest[..digits].parse().ok()?;
    Some((&line[..at], since, &rest[digits..]))
}

/// The `since unix time N` of a holder line.
fn holder_since(line: &str) -> Option<u64> {
    split_since(line).map(|(_, since, _)| since)
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `YYYY-MM-DDTHH:MM:SSZ` of a unix time in seconds.
pub fn utc_iso(secs: u64) -> String {
    let secs = secs as i64;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// A duration in seconds as `42 s`, `3 min 5 s`, `2 h 10 min`, `3 d 4 h`.
fn age(secs: u64) -> String {
    match secs {
        0..60 => format!("{secs} s"),
        60..3600 => format!("{} min {} s", secs / 60, secs % 60),
        3600..86_400 => format!("{} h {} min", secs / 3600, secs % 3600 / 60),
        _ => format!("{} d {} h", secs / 86_400, secs % 86_400 / 3600),
    }
}

/// Rewrites the lock file's `since unix time T` (kept machine-readable in
/// the file) as a UTC time and an age for people.
fn humanize_holder(line: &str, now: u64) -> String {
    match split_since(line) {
        Some((before, since, after)) => format!(
            "{before}since {} ({} ago){after}",
            utc_iso(since),
            age(now.saturating_sub(since))
        ),
        None => line.to_string(),
    }
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
                    humanize_holder(text, now_secs())
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
        // A clean release empties the file: a holder line left in it means
        // the previous holder died holding the lock (killed mid-commit).
        let mut left = String::new();
        let _ = file.seek(SeekFrom::Start(0));
        let _ = file.read_to_string(&mut left);
        let now = now_secs();
        let abandoned_since = holder_since(left.trim()).map(|t| t.min(now));
        let line = format!(
            "{holder} (pid {}, since unix time {now})\n",
            std::process::id(),
        );
        let _ = file.set_len(0);
        let _ = file.seek(SeekFrom::Start(0));
        let _ = file.write_all(line.as_bytes());
        Ok(WriteLock {
            file,
            path,
            abandoned_since,
        })
    }

    /// When the previous holder took the lock, in ms since the epoch, if it
    /// died holding it (its holder line was still there): nobody could write
    /// from then until now.
    pub fn abandoned_since_ms(&self) -> Option<i64> {
        self.abandoned_since
            .map(|s| (s as i64).saturating_mul(1000))
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
    fn holder_time_is_shown_as_utc_and_age() {
        assert_eq!(
            humanize_holder("dsv gc (pid 7, since unix time 1764495000)", 1_764_495_125),
            "dsv gc (pid 7, since 2025-11-30T09:30:00Z (2 min 5 s ago))"
        );
        assert_eq!(humanize_holder("odd line", 5), "odd line");
        assert_eq!(utc_iso(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc_iso(951_782_400), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn a_holder_line_left_behind_means_the_holder_died_holding_it() {
        let dir = tempfile::tempdir().unwrap();
        // A clean release leaves nothing behind.
        drop(WriteLock::acquire(dir.path(), Duration::from_millis(10), "a").unwrap());
        let l = WriteLock::acquire(dir.path(), Duration::from_millis(10), "b").unwrap();
        assert_eq!(l.abandoned_since_ms(), None);
        drop(l);
        // A holder killed while holding it leaves its line.
        let since = now_secs() - 5;
        std::fs::write(
            dir.path().join(LOCK_FILE),
            format!("dsv gc (pid 4242, since unix time {since})\n"),
        )
        .unwrap();
        let l = WriteLock::acquire(dir.path(), Duration::from_millis(10), "c").unwrap();
        assert_eq!(l.abandoned_since_ms(), Some(since as i64 * 1000));
    }

    #[test]
    fn second_taker_times_out_naming_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let held =
            WriteLock::acquire(dir.path(), Duration::from_millis(10), "dsv test-holder").unwrap();
        let err = WriteLock::acquire(dir.path(), Duration::from_millis(30), "other").unwrap_err();
        match err {
            Error::LockTimeout { holder, .. } => {
                assert!(holder.contains("dsv test-holder"), "{holder}");
                assert!(!holder.contains("unix time"), "{holder}");
                assert!(holder.contains(" s ago)"), "{holder}");
            }
            other => panic!("unexpected {other:?}"),
        }
        drop(held);
        WriteLock::acquire(dir.path(), Duration::from_millis(10), "other").unwrap();
    }
}
