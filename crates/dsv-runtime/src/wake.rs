//! Waiting for a change of the repository.
//!
//! Every loop of the runtime (agent, trigger loop) waits here, and only
//! here, for "something it cares about changed": a subscription on the
//! metadata seam's change feed ([`dsv_store::Store::subscribe`]) for the
//! keyspaces the loop reads — queues and events for an agent, events and
//! trigger definitions for a trigger loop. Commits by any process wake it
//! (the backend's own mechanism: inotify on RocksDB's folder locally), and
//! changes elsewhere (heartbeats, logs, ingests) do not. The wait is bounded
//! by a timeout so periodic work (reaping expired leases, stop flags) still
//! happens.

use std::time::Duration;

use dsv::Repo;
use dsv_store::txn::{app_keyspace, Subscription};

use crate::error::{Error, Result};

/// Wakes a loop when a watched keyspace changes, or after a timeout.
pub struct Wake<'a> {
    sub: Subscription<'a>,
}

/// The keyspaces an agent waits on: queues (new work) and events (triggers
/// it processes in its housekeeping).
pub fn agent_keyspaces() -> Vec<String> {
    vec![
        app_keyspace(dsv::keys::QUEUE),
        app_keyspace(dsv::keys::EVENT),
    ]
}

/// The keyspaces a trigger loop waits on: events and trigger definitions.
pub fn trigger_keyspaces() -> Vec<String> {
    vec![app_keyspace(dsv::keys::EVENT), app_keyspace(b"tg/")]
}

impl<'a> Wake<'a> {
    /// Subscribes to `keyspaces` of the repository.
    pub fn new(repo: &'a Repo, keyspaces: &[String]) -> Result<Wake<'a>> {
        let sub = repo
            .store()
            .subscribe(keyspaces)
            .map_err(|e| Error::Watch {
                path: repo.store().dir().join("db"),
                message: e.to_string(),
            })?;
        Ok(Wake { sub })
    }

    /// Blocks until a watched keyspace changed (since the last wake-up or
    /// drain) or `timeout`. The repository's read view is fresh after it.
    pub fn wait(&mut self, timeout: Duration) {
        if let Err(e) = self.sub.wait(timeout) {
            // A failed check (the database briefly unreadable) must not spin:
            // the loop does its periodic work and comes back.
            tracing::debug!("change feed: {e}");
            std::thread::sleep(timeout.min(Duration::from_millis(200)));
        }
    }

    /// Forgets the changes so far (the caller has just looked at the
    /// repository, so they are not news).
    pub fn drain(&mut self) {
        let _ = self.sub.wait(Duration::ZERO);
    }
}
