//! Agents' presence records: who serves which queues, on which host, what
//! it runs now, and when it was last heard of (`dsv agent list`). Each
//! agent writes its own record (`ag/` · agent id) when it starts, when it
//! takes or ends a task, and at least every idle wait; on a clean exit it
//! marks the record stopped. A record whose heartbeat is older than its
//! agent's idle bound by a margin counts as lost (the machine vanished).
//! Records of stopped or lost agents older than a day are dropped by the
//! next beat of any agent.

use serde::{Deserialize, Serialize};

use dsv_store::{Batch, Cf};

use crate::error::Result;
use crate::repo::Repo;
use crate::task::AgentInfo;

use crate::keys::AGENT;

/// How long records of agents gone are kept.
const KEEP_GONE_MS: i64 = 86_400_000;

/// What an agent is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AgentState {
    /// Waiting for work.
    Idle,
    /// Running a task.
    Running,
    /// Exited cleanly.
    Stopped,
}

/// An agent's presence record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentPresence {
    /// Who.
    pub agent: AgentInfo,
    /// The queues it serves.
    pub queues: Vec<String>,
    /// Whether it also fires triggers.
    pub triggers: bool,
    /// Its state.
    pub state: AgentState,
    /// The task it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    /// When it started, ms.
    pub started_ms: i64,
    /// Its last heartbeat, ms.
    pub beat_ms: i64,
    /// The longest it stays silent while alive, ms (its idle wait or its
    /// task heartbeat period, whichever is longer).
    pub beat_every_ms: i64,
}

impl AgentPresence {
    /// Whether the agent is presumed gone at `now_ms`: not stopped, and
    /// silent for three of its beat periods (at least 30 s) since
    /// `heard_ms`.
    fn lost_since(&self, heard_ms: i64, now_ms: i64) -> bool {
        self.state != AgentState::Stopped
            && now_ms - heard_ms > (3 * self.beat_every_ms).max(30_000)
    }

    /// [`AgentPresence::lost_since`] its own last beat.
    pub fn lost(&self, now_ms: i64) -> bool {
        self.lost_since(self.beat_ms, now_ms)
    }
}

/// An agent as `dsv agent list` shows it.
#[derive(Debug, Clone)]
pub struct AgentStatus {
    /// Its presence record.
    pub presence: AgentPresence,
    /// When it was last heard of: its own beat, or the heartbeat of the
    /// task it runs, whichever is later.
    pub heard_ms: i64,
    /// Silent for too long while not stopped (its machine vanished).
    pub lost: bool,
}

fn key(id: &str) -> Vec<u8> {
    [AGENT, id.as_bytes()].concat()
}

impl Repo {
    /// Writes an agent's presence record (its heartbeat); with `prune`
    /// (an agent's first beat), also drops the records of agents stopped,
    /// or idle and silent, for more than a day (a running agent's record is
    /// kept: its task's heartbeat speaks for it). Only the first beat reads
    /// the other records, so that agents' beats do not collide.
    pub fn agent_beat(&self, p: &AgentPresence, prune: bool) -> Result<()> {
        let value = serde_json::to_vec(p).expect("serializable");
        let k = key(&p.agent.id);
        self.write(|kv| {
            let mut b = Batch::default();
            if prune {
                kv.scan(Cf::App, AGENT, &mut |key, v| {
                    if let Ok(old) = serde_json::from_slice::<AgentPresence>(v) {
                        let gone = old.state == AgentState::Stopped
                            || (old.state == AgentState::Idle && old.lost(p.beat_ms));
                        if gone && p.beat_ms - old.beat_ms > KEEP_GONE_MS {
                            b.delete(Cf::App, key.to_vec());
                        }
                    }
                    Ok(true)
                })?;
            }
            b.put(Cf::App, k.clone(), value.clone());
            Ok((b, ()))
        })
    }

    /// Every agent with when it was last heard of (a running task's
    /// heartbeat counts) and whether it is lost, at `now_ms`, by name.
    pub fn agent_statuses(&self, now_ms: i64) -> Result<Vec<AgentStatus>> {
        let mut out = Vec::new();
        for p in self.agents()? {
            let task_beat = match &p.task {
                Some(t) => self.task(t).ok().and_then(|t| t.heartbeat_ms),
                None => None,
            };
            let heard_ms = p.beat_ms.max(task_beat.unwrap_or(0));
            out.push(AgentStatus {
                lost: p.lost_since(heard_ms, now_ms),
                heard_ms,
                presence: p,
            });
        }
        Ok(out)
    }

    /// Every agent's presence record, by name.
    pub fn agents(&self) -> Result<Vec<AgentPresence>> {
        let mut out = Vec::new();
        self.store().reader().scan(Cf::App, AGENT, &mut |_, v| {
            if let Ok(p) = serde_json::from_slice::<AgentPresence>(v) {
                out.push(p);
            }
            Ok(true)
        })?;
        out.sort_by(|a, b| (&a.agent.name, a.started_ms).cmp(&(&b.agent.name, b.started_ms)));
        Ok(out)
    }
}
