//! Triggers: rules that consume the event log from a stored cursor and
//! launch tasks (clone + enqueue) or promote models.
//!
//! Exactly-once: a firing — the cloned task, its queue entry, the history
//! record and the cursor advance — is one atomic write, made after
//! re-reading the cursor under the write lock. A crash before the write
//! leaves the event unprocessed (it fires on restart); after it, the event
//! is behind the cursor (it never fires again). `single_instance` stops a
//! trigger at an event while its previous launch is queued or running: the
//! cursor stays, so the event is deferred, never dropped. Events a trigger
//! ignores are passed by the cursor of its next firing, or by one write at
//! the end of a run.

use std::collections::BTreeMap;

use dsv_store::{Batch, Cf, KvRead};
use globset::Glob;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::events::{read_after, Event, EventKind, EventWriter};
use crate::records::{from_json, scan_json, to_json};
use crate::repo::Repo;
use crate::task::{Model, Task, TaskStatus};

const TRIGGER: &[u8] = b"tg/";
const HISTORY: &[u8] = b"th/";

/// What a trigger does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum Action {
    /// Clone a task with (templated) overrides and enqueue the clone.
    Clone {
        /// Task to clone (full id).
        task: String,
        /// `SECTION/KEY` → value, `${dataset.id}` etc. substituted.
        overrides: BTreeMap<String, String>,
        /// Queue.
        queue: String,
    },
    /// Promote the event's model when it beats production.
    Promote {
        /// Metric compared.
        metric: String,
        /// Required improvement.
        margin: f64,
        /// The metric is a loss or an error: lower is better.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        lower_is_better: bool,
    },
    /// Tag the event's model `canary` (a server then tries it on a share of
    /// real traffic and its feedback gate promotes or rejects it); the
    /// line's previous canary, if any, loses the tag.
    Canary,
}

/// A trigger.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trigger {
    /// Unique name.
    pub name: String,
    /// `dataset`, `task` or `model`.
    pub on: String,
    /// Project filter (datasets created later included); `None` = any.
    #[serde(default)]
    pub project: Option<String>,
    /// Dataset name glob.
    #[serde(default)]
    pub dataset: Option<String>,
    /// Tags the version (or model) must carry.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Dataset event kinds: `finalized` and/or `tagged` (default finalized).
    #[serde(default)]
    pub events: Vec<String>,
    /// Task statuses (default completed).
    #[serde(default)]
    pub statuses: Vec<String>,
    /// Task metric threshold: (metric, above?, value).
    #[serde(default)]
    pub threshold: Option<(String, bool, f64)>,
    /// What to do.
    pub action: Action,
    /// Defer while the previous launch is queued or running.
    #[serde(default)]
    pub single_instance: bool,
    /// Last event sequence processed.
    pub cursor: u64,
    /// When added, ms.
    pub created_ms: i64,
}

/// One firing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Firing {
    /// Trigger.
    pub trigger: String,
    /// Event sequence.
    pub event: u64,
    /// Event kind.
    pub kind: EventKind,
    /// When, ms.
    pub time_ms: i64,
    /// The subject (version, task or model id).
    pub subject: String,
    /// Task launched.
    #[serde(default)]
    pub task: Option<String>,
    /// Model promoted (or not: see `note`).
    #[serde(default)]
    pub model: Option<String>,
    /// What was decided.
    #[serde(default)]
    pub note: String,
}

fn trigger_key(name: &str) -> Vec<u8> {
    [TRIGGER, name.as_bytes()].concat()
}
fn history_key(name: &str, seq: u64) -> Vec<u8> {
    [HISTORY, name.as_bytes(), &[0], &seq.to_be_bytes()].concat()
}

const TEMPLATE_KEYS: [&str; 6] = [
    "dataset.id",
    "dataset.version",
    "dataset.project",
    "dataset.name",
    "task.id",
    "model.id",
];

/// The placeholders an event of a trigger's kind (`on`) fills: dataset
/// events carry a version, task events their task (and `${model.id}` when
/// the task produced a model), model events their model.
pub fn placeholders_of(on: &str) -> &'static [&'static str] {
    match on {
        "dataset" => &TEMPLATE_KEYS[..4],
        "task" => &TEMPLATE_KEYS[4..],
        "model" => &TEMPLATE_KEYS[5..],
        _ => &[],
    }
}

fn placeholder_list(keys: &[&str]) -> String {
    keys.iter()
        .map(|k| format!("${{{k}}}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The placeholder names in a value, in order.
fn placeholders_in(v: &str) -> Result<Vec<&str>> {
    let mut out = Vec::new();
    let mut rest = v;
    while let Some(i) = rest.find("${") {
        let after = &rest[i + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| Error::Invalid(format!("unterminated '${{' in '{v}'")))?;
        out.push(&after[..end]);
        rest = &after[end + 1..];
    }
    Ok(out)
}

/// Checks `${…}` placeholders in a value (any event kind).
pub fn check_template(v: &str) -> Result<()> {
    for key in placeholders_in(v)? {
        if !TEMPLATE_KEYS.contains(&key) {
            return Err(Error::Invalid(format!(
                "unknown placeholder '${{{key}}}' in '{v}' (known: {})",
                placeholder_list(&TEMPLATE_KEYS)
            )));
        }
    }
    Ok(())
}

/// Checks `${…}` placeholders in a value of a trigger on `on` events:
/// each must be one its events fill.
pub fn check_template_for(on: &str, v: &str) -> Result<()> {
    check_template(v)?;
    let avail = placeholders_of(on);
    for key in placeholders_in(v)? {
        if !avail.contains(&key) {
            return Err(Error::Invalid(format!(
                "placeholder '${{{key}}}' in '{v}' cannot be filled by {on} events \
                 (available for {on} triggers: {})",
                placeholder_list(avail)
            )));
        }
    }
    Ok(())
}

fn render(v: &str, vars: &BTreeMap<&str, String>) -> String {
    let mut out = v.to_string();
    for (k, val) in vars {
        out = out.replace(&format!("${{{k}}}"), val);
    }
    out
}

fn task_in(kv: &dyn KvRead, id: &str) -> Result<Option<Task>> {
    match kv.get(Cf::App, &[crate::keys::TASK, id.as_bytes()].concat())? {
        Some(v) => Ok(Some(from_json(&v, "task")?)),
        None => Ok(None),
    }
}

impl Trigger {
    fn matches(&self, e: &Event) -> bool {
        if let Some(p) = &self.project {
            if &e.project != p {
                return false;
            }
        }
        let has_tags = |tags: &[String]| self.tags.iter().all(|t| tags.contains(t));
        match self.on.as_str() {
            "dataset" => {
                let kind = match e.kind {
                    EventKind::VersionFinalized => "finalized",
                    EventKind::VersionTagged => "tagged",
                    _ => return false,
                };
                let kinds = if self.events.is_empty() {
                    vec!["finalized".to_string()]
                } else {
                    self.events.clone()
                };
                if !kinds.iter().any(|k| k == kind) {
                    return false;
                }
                if e.kind == EventKind::VersionTagged
                    && !self.tags.is_empty()
                    && !self.tags.iter().any(|t| e.tags_added.contains(t))
                {
                    return false;
                }
                if let Some(g) = &self.dataset {
                    match Glob::new(g) {
                        Ok(g) if g.compile_matcher().is_match(&e.name) => {}
                        _ => return false,
                    }
                }
                has_tags(&e.tags)
            }
            "task" => {
                if e.kind != EventKind::TaskStatus {
                    return false;
                }
                let status = e.extra.get("status").and_then(|s| s.as_str()).unwrap_or("");
                let statuses = if self.statuses.is_empty() {
                    vec!["completed".to_string()]
                } else {
                    self.statuses.clone()
                };
                if !statuses.iter().any(|s| s == status) {
                    return false;
                }
                if let Some((m, above, x)) = &self.threshold {
                    let Some(v) = e
                        .extra
                        .get("metrics")
                        .and_then(|ms| ms.get(m))
                        .and_then(|v| v.as_f64())
                    else {
                        return false;
                    };
                    if *above && v <= *x || !*above && v >= *x {
                        return false;
                    }
                }
                if let Action::Promote { .. } | Action::Canary = self.action {
                    return e.extra.contains_key("model");
                }
                true
            }
            "model" => {
                e.kind == EventKind::ModelTagged
                    && self.tags.iter().all(|t| e.tags.contains(t))
                    && (self.tags.is_empty() || self.tags.iter().any(|t| e.tags_added.contains(t)))
            }
            _ => false,
        }
    }
}

fn vars_of(e: &Event) -> BTreeMap<&'static str, String> {
    let mut v = BTreeMap::new();
    if let Some(id) = &e.version_id {
        v.insert("dataset.id", id.clone());
        v.insert("dataset.version", e.version.clone().unwrap_or_default());
        v.insert("dataset.project", e.project.clone());
        v.insert("dataset.name", e.name.clone());
    }
    if let Some(t) = e.extra.get("task").and_then(|x| x.as_str()) {
        v.insert("task.id", t.to_string());
    }
    if let Some(m) = e.extra.get("model").and_then(|x| x.as_str()) {
        v.insert("model.id", m.to_string());
    }
    v
}

fn subject_of(e: &Event) -> String {
    e.version_id
        .clone()
        .or_else(|| {
            e.extra
                .get("model")
                .and_then(|x| x.as_str())
                .map(String::from)
        })
        .or_else(|| {
            e.extra
                .get("task")
                .and_then(|x| x.as_str())
                .map(String::from)
        })
        .unwrap_or_default()
}

/// Evaluates a model on an evaluation version (hex id), giving the named
/// metric (e.g. `test/accuracy`): how the production model is compared with
/// a new one on the same data when their evaluation data differ.
pub type Evaluate<'a> = &'a dyn Fn(&Model, &str, &str) -> Option<f64>;

/// A promotion decision: (new model, `Some(previous production id or "")`
/// when it is to be promoted, explanation).
pub type Decision = (String, Option<String>, String);

impl Repo {
    /// Compares model `new_id` with the production model of its project on
    /// the same evaluation data (re-evaluating production through
    /// `evaluate` when their evaluation versions differ). The new model must
    /// beat production by more than `margin`: above it, or below it when
    /// `lower_is_better` (a loss or an error).
    pub fn promotion_decision(
        &self,
        new_id: &str,
        metric: &str,
        margin: f64,
        lower_is_better: bool,
        evaluate: Evaluate<'_>,
    ) -> Result<Decision> {
        let new = self.model(new_id)?;
        let prod = self
            .models_in(Some(&new.project), Some("production"))?
            .into_iter()
            .find(|m| m.id != new.id);
        let Some(s) = new.metrics.get(metric).copied() else {
            return Ok((
                new.id,
                None,
                format!("not promoted: the model has no metric '{metric}'"),
            ));
        };
        let Some(p) = prod else {
            return Ok((
                new.id,
                Some(String::new()),
                format!("promoted: first production model ({metric} {s:.4})"),
            ));
        };
        let same_eval = p.datasets.get(1).is_some() && p.datasets.get(1) == new.datasets.get(1);
        // Production's own figure when it was evaluated on the same data and
        // has this metric; otherwise it is evaluated now (a model trained
        // before a metric existed, or on other evaluation data).
        let stored = if same_eval {
            p.metrics.get(metric).copied()
        } else {
            None
        };
        let old = stored.or_else(|| new.datasets.get(1).and_then(|ev| evaluate(&p, ev, metric)));
        Ok(match old {
            Some(o) if !lower_is_better && s > o + margin => (
                new.id,
                Some(p.id.clone()),
                format!("promoted: {metric} {s:.4} > production {o:.4} + {margin}"),
            ),
            Some(o) if lower_is_better && s < o - margin => (
                new.id,
                Some(p.id.clone()),
                format!(
                    "promoted: {metric} {s:.4} < production {o:.4} - {margin} (lower is better)"
                ),
            ),
            Some(o) => (
                new.id,
                None,
                format!("not promoted: {metric} {s:.4} vs production {o:.4} (margin {margin})"),
            ),
            None => (
                new.id,
                None,
                "not promoted: production could not be evaluated on the same data".into(),
            ),
        })
    }

    /// Applies a decision: tags the new model `production` and the previous
    /// one `previous` in one write with one model event. Returns whether it
    /// promoted.
    pub fn apply_promotion(&self, d: &Decision) -> Result<bool> {
        let (new, old, _) = d;
        let Some(old) = old else { return Ok(false) };
        self.write(|kv| {
            crate::task::ensure_production_is(kv, new, old)?;
            let mut b = Batch::default();
            let mut ev = EventWriter::sequenced();
            crate::task::promote_batch(
                kv,
                &mut b,
                &mut ev,
                new,
                (!old.is_empty()).then_some(old.as_str()),
            )?;
            Ok((b, true))
        })
    }

    /// Adds a trigger; it sees events from now on.
    pub fn add_trigger(&self, mut t: Trigger) -> Result<Trigger> {
        dsv_store::store::validate_label(&t.name, "trigger name")?;
        if let Action::Clone {
            task,
            overrides,
            queue,
        } = &mut t.action
        {
            let src = self.task(task)?;
            *task = src.id.clone();
            // The rule of `task clone --set`, applied now rather than when
            // the trigger fires; placeholders must be ones its events fill.
            let mut params = src.params.clone();
            for (k, v) in overrides.iter() {
                crate::params::check_key_form(k)?;
                check_template_for(&t.on, v)?;
                params.insert(k.clone(), v.clone());
            }
            crate::params::check_task_params(&src.kind, &params)?;
            if queue.is_empty() {
                *queue = "default".into();
            }
        }
        if let Some(g) = &t.dataset {
            Glob::new(g).map_err(|e| Error::Invalid(format!("bad dataset pattern '{g}': {e}")))?;
        }
        for s in &t.statuses {
            TaskStatus::parse(s)?;
        }
        for k in &t.events {
            if k != "finalized" && k != "tagged" {
                return Err(Error::Invalid(format!(
                    "unknown dataset event '{k}' (finalized, tagged)"
                )));
            }
        }
        self.write(|kv| {
            if kv.get(Cf::App, &trigger_key(&t.name))?.is_some() {
                return Err(Error::Invalid(format!(
                    "a trigger named '{}' exists",
                    t.name
                )));
            }
            t.cursor = crate::events::last_seq(kv)?;
            t.created_ms = dsv_store::store::now_ms();
            let mut b = Batch::default();
            b.put(Cf::App, trigger_key(&t.name), to_json(&t));
            Ok((b, t.clone()))
        })
    }

    /// Every trigger, by name.
    pub fn triggers(&self) -> Result<Vec<Trigger>> {
        scan_json(
            &*self.store().reader(),
            TRIGGER,
            "trigger",
            |_: &Trigger| true,
        )
    }

    /// Removes a trigger (its history stays).
    pub fn remove_trigger(&self, name: &str) -> Result<()> {
        self.write(|kv| {
            if kv.get(Cf::App, &trigger_key(name))?.is_none() {
                return Err(Error::Invalid(format!("no trigger named '{name}'")));
            }
            let mut b = Batch::default();
            b.delete(Cf::App, trigger_key(name));
            Ok((b, ()))
        })
    }

    /// A trigger's firings, oldest first.
    pub fn trigger_history(&self, name: &str) -> Result<Vec<Firing>> {
        let kv = self.store().reader();
        if kv.get(Cf::App, &trigger_key(name))?.is_none() {
            return Err(Error::Invalid(format!("no trigger named '{name}'")));
        }
        scan_json(
            &*kv,
            &[HISTORY, name.as_bytes(), &[0]].concat(),
            "firing",
            |_: &Firing| true,
        )
    }

    /// Processes every trigger against the events after its cursor; returns the firings.
    pub fn run_triggers(&self, evaluate: Evaluate<'_>) -> Result<Vec<Firing>> {
        let mut fired = Vec::new();
        for t in self.triggers()? {
            let events = read_after(&*self.store().reader(), t.cursor, 10_000)?;
            // Events the trigger ignores cost no write of their own: the
            // cursor passes them with the next firing, or in one write at
            // the end of the run.
            let mut skipped_to = None;
            for e in events {
                if !t.matches(&e) {
                    skipped_to = Some(e.seq);
                    continue;
                }
                match self.process(&t.name, &e, evaluate)? {
                    Step::Fired(f) => fired.push(f),
                    Step::Skipped => {}
                    Step::Deferred | Step::Gone => break,
                }
                skipped_to = None;
            }
            if let Some(to) = skipped_to {
                self.advance_cursor(&t.name, to)?;
            }
        }
        Ok(fired)
    }

    /// Moves a trigger's cursor forward to `to` (never back).
    fn advance_cursor(&self, name: &str, to: u64) -> Result<()> {
        self.write(|kv| {
            let mut b = Batch::default();
            if let Some(v) = kv.get(Cf::App, &trigger_key(name))? {
                let mut t: Trigger = from_json(&v, "trigger")?;
                if t.cursor < to {
                    t.cursor = to;
                    b.put(Cf::App, trigger_key(name), to_json(&t));
                }
            }
            Ok((b, ()))
        })
    }

    fn process(&self, name: &str, e: &Event, evaluate: Evaluate<'_>) -> Result<Step> {
        // A promotion decided against a production model that another gate
        // replaced meanwhile is decided again (bounded).
        let mut tries = 0;
        loop {
            match self.process_once(name, e, evaluate) {
                Err(Error::Conflict(why)) if tries < 5 && why.contains("production model") => {
                    tries += 1;
                }
                r => return r,
            }
        }
    }

    fn process_once(&self, name: &str, e: &Event, evaluate: Evaluate<'_>) -> Result<Step> {
        // Promotion needs models read outside the lock (re-evaluation).
        let mut decision: Option<(String, Option<String>, String)> = None;
        {
            let kv = self.store().reader();
            let Some(v) = kv.get(Cf::App, &trigger_key(name))? else {
                return Ok(Step::Gone);
            };
            let t: Trigger = from_json(&v, "trigger")?;
            if t.cursor >= e.seq {
                return Ok(Step::Skipped);
            }
            if t.matches(e) {
                if let Action::Promote {
                    metric,
                    margin,
                    lower_is_better,
                } = &t.action
                {
                    let new_id = e.extra.get("model").and_then(|x| x.as_str()).unwrap_or("");
                    decision = Some(self.promotion_decision(
                        new_id,
                        metric,
                        *margin,
                        *lower_is_better,
                        evaluate,
                    )?);
                }
            }
        }
        self.write(|kv| {
            let Some(v) = kv.get(Cf::App, &trigger_key(name))? else {
                return Ok((Batch::default(), Step::Gone));
            };
            let mut t: Trigger = from_json(&v, "trigger")?;
            if t.cursor >= e.seq {
                return Ok((Batch::default(), Step::Skipped));
            }
            let mut b = Batch::default();
            if !t.matches(e) {
                t.cursor = e.seq;
                b.put(Cf::App, trigger_key(name), to_json(&t));
                return Ok((b, Step::Skipped));
            }
            let mut f = Firing {
                trigger: name.to_string(),
                event: e.seq,
                kind: e.kind,
                time_ms: dsv_store::store::now_ms(),
                subject: subject_of(e),
                task: None,
                model: None,
                note: String::new(),
            };
            let mut ev = EventWriter::sequenced();
            match &t.action {
                Action::Clone {
                    task,
                    overrides,
                    queue,
                } => {
                    if t.single_instance {
                        // The last firing: one step of a backward scan.
                        let last = kv
                            .last(Cf::App, &[HISTORY, name.as_bytes(), &[0]].concat())?
                            .and_then(|(_, v)| from_json::<Firing>(&v, "firing").ok());
                        if let Some(prev) = last.and_then(|l| l.task) {
                            if let Some(p) = task_in(kv, &prev)? {
                                if matches!(
                                    p.status,
                                    TaskStatus::Queued | TaskStatus::Running | TaskStatus::Draft
                                ) {
                                    return Ok((Batch::default(), Step::Deferred));
                                }
                            }
                        }
                    }
                    let src = task_in(kv, task)?.ok_or_else(|| {
                        Error::Invalid(format!("trigger '{name}': its task {task} is gone"))
                    })?;
                    let vars = vars_of(e);
                    let mut params = src.params.clone();
                    let mut unfilled = Vec::new();
                    for (k, v) in overrides {
                        for key in placeholders_in(v).unwrap_or_default() {
                            if !vars.contains_key(key) {
                                unfilled.push(format!("${{{key}}} in {k}"));
                            }
                        }
                        params.insert(k.clone(), render(v, &vars));
                    }
                    if !unfilled.is_empty() {
                        // E.g. `${model.id}` of a task that produced no
                        // model: no clone that would fail later.
                        f.note = format!(
                            "not launched: this event does not fill {}",
                            unfilled.join(", ")
                        );
                    } else {
                        let mut c = src.child(&src.name, params)?;
                        crate::task::queue_batch(&mut b, None, &mut c, queue);
                        crate::task::status_event(&mut ev, &mut b, &c);
                        f.task = Some(c.id.clone());
                        f.note = format!("launched {} on '{queue}'", &c.id[..12]);
                    }
                }
                Action::Canary => {
                    let id = e.extra.get("model").and_then(|x| x.as_str()).unwrap_or("");
                    f.model = Some(id.to_string());
                    f.note = crate::task::canary_batch(kv, &mut b, &mut ev, id)?;
                }
                Action::Promote { .. } => {
                    let (new_id, old, note) = decision.clone().unwrap_or_default();
                    f.model = Some(new_id.clone());
                    f.note = note;
                    if let Some(old) = old {
                        crate::task::ensure_production_is(kv, &new_id, &old)?;
                        crate::task::promote_batch(
                            kv,
                            &mut b,
                            &mut ev,
                            &new_id,
                            (!old.is_empty()).then_some(old.as_str()),
                        )?;
                    }
                }
            }
            t.cursor = e.seq;
            b.put(Cf::App, trigger_key(name), to_json(&t));
            b.put(Cf::App, history_key(name, e.seq), to_json(&f));
            Ok((b, Step::Fired(f)))
        })
    }
}

enum Step {
    Fired(Firing),
    Skipped,
    Deferred,
    Gone,
}
