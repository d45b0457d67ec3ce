//! Waiting for a change of the repository.
//!
//! Every loop of the runtime (agent, trigger loop) waits here, and only
//! here, for "something may have changed": today inotify on `.dsv/db`
//! (another process's write touches it), bounded by a timeout so periodic
//! work (reaping dead agents, stop flags) still happens. The interface is
//! kept narrow so the mechanism can change without touching the loops.

use std::sync::mpsc;
use std::time::Duration;

use dsv::Repo;

use crate::error::{Error, Result};

/// Wakes a loop when the repository's database changes, or after a timeout.
pub struct Wake {
    rx: mpsc::Receiver<()>,
    _watcher: notify::RecommendedWatcher,
}

impl Wake {
    /// Watches the repository's database folder.
    pub fn new(repo: &Repo) -> Result<Wake> {
        use notify::Watcher;
        let db = repo.store().dir().join("db");
        let (tx, rx) = mpsc::channel::<()>();
        let mut watcher =
            notify::recommended_watcher(move |_res: notify::Result<notify::Event>| {
                let _ = tx.send(());
            })
            .map_err(|e| Error::Watch {
                path: db.clone(),
                message: e.to_string(),
            })?;
        watcher
            .watch(&db, notify::RecursiveMode::NonRecursive)
            .map_err(|e| Error::Watch {
                path: db.clone(),
                message: e.to_string(),
            })?;
        Ok(Wake {
            rx,
            _watcher: watcher,
        })
    }

    /// Blocks until a change or `timeout`; forgets the notifications queued
    /// so far (one wake-up for a burst of writes).
    pub fn wait(&self, timeout: Duration) {
        let _ = self.rx.recv_timeout(timeout);
        self.drain();
    }

    /// Forgets the notifications so far (the caller has just looked at the
    /// repository, so they are not news).
    pub fn drain(&self) {
        while self.rx.try_recv().is_ok() {}
    }
}
