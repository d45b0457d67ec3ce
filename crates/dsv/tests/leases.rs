//! Leases on running tasks and the secondary indexes of tasks and models,
//! on the in-memory backend. Time is controlled by passing `now_ms`; no
//! test sleeps.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use dsv::task::{Beat, DEFAULT_LEASE_TTL_MS};
use dsv::{AgentInfo, Finish, Repo, Task, TaskStatus};
use dsv_store::kv::{Backend, Batch, KvRead, KvWrite, MemKv, TxnBody, Visitor};
use dsv_store::{Cf, RepoConfig, Store, StoreOptions};

fn repo_on(dir: &Path, backend: Box<dyn Backend>) -> Repo {
    Repo::from_store(
        Store::init_with_backend(
            &dir.join(".dsv"),
            RepoConfig::default(),
            backend,
            StoreOptions::default(),
        )
        .unwrap(),
    )
}

fn queued(repo: &Repo, project: &str) -> Task {
    let t = repo
        .create_task(project, "m", "trainer", None, Default::default())
        .unwrap();
    repo.enqueue(&t.id, "default").unwrap()
}

fn q() -> Vec<String> {
    vec!["default".to_string()]
}

const TTL: i64 = 1_000;

#[test]
fn renewals_keep_a_task_alive_across_many_ttls() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repo_on(dir.path(), Box::new(MemKv::new()));
    queued(&repo, "p");
    let agent = AgentInfo::new("a", "h", 1).unwrap();
    let t0 = 1_000_000;
    let t = repo.dequeue_at(&q(), &agent, TTL, t0).unwrap().unwrap();
    let lease = t.lease.clone().unwrap();
    assert_eq!(lease.holder, agent.id);
    assert_eq!((lease.renewed_ms, lease.expires_ms), (t0, t0 + TTL));
    let never = |_: &AgentInfo| false;
    let mut now = t0;
    // 40 renewals at ttl/3: 13 ttl's. Each reaper looks just before the
    // lease would run out, and at its exact expiry (not yet past it).
    for _ in 0..40 {
        now += dsv::task::renew_every_ms(TTL);
        assert_eq!(
            repo.heartbeat_lease(&t.id, &lease.run, "", now).unwrap(),
            Beat::Continue
        );
        for look in [now, now + TTL - 1, now + TTL] {
            assert!(
                repo.reap_expired_at(look, true, &never, TTL)
                    .unwrap()
                    .is_empty(),
                "{look}"
            );
        }
    }
    assert!(now - t0 > 10 * TTL);
    let held = repo.task(&t.id).unwrap();
    assert_eq!(held.status, TaskStatus::Running);
    assert_eq!(held.lease.as_ref().unwrap().expires_ms, now + TTL);
    assert_eq!(
        held.lease.as_ref().unwrap().run,
        lease.run,
        "same run throughout"
    );
    // Renewals stop: one ms past the expiry it is reaped.
    let reaped = repo
        .reap_expired_at(now + TTL + 1, true, &never, TTL)
        .unwrap();
    assert_eq!(reaped.len(), 1);
}

#[test]
fn an_expired_lease_is_requeued_and_the_old_run_is_told_to_stop() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repo_on(dir.path(), Box::new(MemKv::new()));
    queued(&repo, "p");
    let (a, b) = (
        AgentInfo::new("a", "h", 1).unwrap(),
        AgentInfo::new("b", "h", 2).unwrap(),
    );
    assert_ne!(a.id, b.id, "agent ids are unique");
    let t0 = 2_000_000;
    let t = repo.dequeue_at(&q(), &a, TTL, t0).unwrap().unwrap();
    let old_run = t.lease.clone().unwrap().run;
    // A live pid does not keep an expired lease: the same-host check says
    // "alive" and the task is reaped anyway.
    let alive = |_: &AgentInfo| false;
    let reaped = repo
        .reap_expired_at(t0 + TTL + 1, true, &alive, TTL)
        .unwrap();
    assert_eq!(reaped.len(), 1);
    assert_eq!(reaped[0].status, TaskStatus::Queued);
    assert!(reaped[0].lease.is_none());
    let e = reaped[0].error.clone().unwrap();
    assert!(
        e.contains("lease") && e.contains("requeued") && e.contains("'a'"),
        "{e}"
    );
    // Reaping twice does nothing more.
    assert!(repo
        .reap_expired_at(t0 + 10 * TTL, true, &alive, TTL)
        .unwrap()
        .is_empty());
    // The old run's heartbeat says stop, and stores no log.
    assert_eq!(
        repo.heartbeat_lease(&t.id, &old_run, "old\n", t0 + TTL + 2)
            .unwrap(),
        Beat::Lost
    );
    // Another agent takes it: a new run.
    let t2 = repo
        .dequeue_at(&q(), &b, TTL, t0 + TTL + 3)
        .unwrap()
        .unwrap();
    assert_eq!(t2.id, t.id);
    let new_run = t2.lease.clone().unwrap().run;
    assert_ne!(new_run, old_run);
    assert_eq!(t2.lease.as_ref().unwrap().holder, b.id);
    assert_eq!(
        repo.heartbeat_lease(&t.id, &old_run, "old\n", t0 + TTL + 4)
            .unwrap(),
        Beat::Lost
    );
    assert!(
        repo.heartbeat_run(&t.id, t.started_ms, "old\n").unwrap(),
        "stop"
    );
    // Its result is refused, by run id and by start time.
    for f in [
        Finish {
            run: Some(old_run.clone()),
            ..Default::default()
        },
        Finish {
            run_started_ms: t.started_ms,
            ..Default::default()
        },
    ] {
        match repo.finish_task(&t.id, f) {
            Err(dsv::Error::Conflict(why)) => assert!(why.contains("dropped"), "{why}"),
            other => panic!("{other:?}"),
        }
    }
    assert!(!repo.task_log(&t.id).unwrap().contains("old"));
    // The current run records its result.
    let done = repo
        .finish_task(
            &t.id,
            Finish {
                run: Some(new_run),
                status: Some(TaskStatus::Completed),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(done.status, TaskStatus::Completed);
    assert!(done.lease.is_none(), "a finished task holds no lease");
}

#[test]
fn an_expired_lease_fails_the_task_under_the_fail_policy() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repo_on(dir.path(), Box::new(MemKv::new()));
    let t = repo
        .create_task("p", "m", "trainer", None, Default::default())
        .unwrap();
    let a = AgentInfo::new("a", "h", 1).unwrap();
    let t0 = 3_000_000;
    let t = repo.start_task_at(&t.id, &a, TTL, t0).unwrap();
    let run = t.lease.clone().unwrap().run;
    let never = |_: &AgentInfo| false;
    assert!(repo
        .reap_expired_at(t0 + TTL, false, &never, TTL)
        .unwrap()
        .is_empty());
    let reaped = repo
        .reap_expired_at(t0 + TTL + 1, false, &never, TTL)
        .unwrap();
    assert_eq!(reaped.len(), 1);
    let failed = repo.task(&t.id).unwrap();
    assert_eq!(failed.status, TaskStatus::Failed);
    assert!(failed.error.unwrap().contains("lease"));
    assert_eq!(
        repo.heartbeat_lease(&t.id, &run, "", t0 + TTL + 2).unwrap(),
        Beat::Lost
    );
    let e = repo
        .finish_task(
            &t.id,
            Finish {
                run: Some(run),
                ..Default::default()
            },
        )
        .unwrap_err();
    assert!(matches!(e, dsv::Error::Conflict(_)), "{e}");
    assert_eq!(repo.task(&t.id).unwrap().status, TaskStatus::Failed);
}

#[test]
fn a_dead_process_on_this_host_is_reaped_before_its_lease_expires() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repo_on(dir.path(), Box::new(MemKv::new()));
    queued(&repo, "p");
    queued(&repo, "p");
    let (a, b) = (
        AgentInfo::new("a", "h", 11).unwrap(),
        AgentInfo::new("b", "h", 12).unwrap(),
    );
    let t0 = 4_000_000;
    let ta = repo.dequeue_at(&q(), &a, TTL, t0).unwrap().unwrap();
    let tb = repo.dequeue_at(&q(), &b, TTL, t0).unwrap().unwrap();
    let a_dead = |x: &AgentInfo| x.pid == 11;
    let reaped = repo.reap_expired_at(t0 + 1, true, &a_dead, TTL).unwrap();
    assert_eq!(
        reaped.iter().map(|t| t.id.clone()).collect::<Vec<_>>(),
        vec![ta.id.clone()]
    );
    assert!(reaped[0].error.as_ref().unwrap().contains("died"));
    assert_eq!(repo.task(&tb.id).unwrap().status, TaskStatus::Running);
    // The interface of before leases: `alive` = Some(true) no longer keeps
    // an expired lease (this one expired long ago, by the real clock).
    let old = repo.task(&tb.id).unwrap();
    assert!(old.lease.unwrap().expires_ms < dsv_store::store::now_ms());
    let r = repo
        .reap_dead_tasks(&|_| Some(true), 3_600_000, false)
        .unwrap();
    assert_eq!(r.len(), 1);
    assert_eq!(repo.task(&tb.id).unwrap().status, TaskStatus::Failed);
}

#[test]
fn a_task_written_before_leases_is_judged_by_its_heartbeat_age() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repo_on(dir.path(), Box::new(MemKv::new()));
    let t = repo
        .create_task("p", "old", "trainer", None, Default::default())
        .unwrap();
    // The record as the previous format wrote it: running, no lease, an
    // agent without id, and no index entries.
    let hb = 5_000_000i64;
    let mut v: serde_json::Value = serde_json::to_value(&t).unwrap();
    v["status"] = "running".into();
    v["started_ms"] = (hb - 500).into();
    v["heartbeat_ms"] = hb.into();
    v["agent"] = serde_json::json!({"name": "old", "host": "h", "pid": 7});
    v.as_object_mut().unwrap().remove("lease");
    repo.store()
        .write(|kv| {
            let mut b = Batch::default();
            // Drop the entries the new build wrote, as if they never were.
            for p in dsv::keys::INDEXES {
                kv.scan(Cf::App, p, &mut |k, _| {
                    b.delete(Cf::App, k.to_vec());
                    Ok(true)
                })?;
            }
            b.put(
                Cf::App,
                [dsv::keys::TASK, t.id.as_bytes()].concat(),
                serde_json::to_vec(&v).unwrap(),
            );
            Ok((b, ()))
        })
        .unwrap();
    assert!(
        repo.tasks(None, Some(TaskStatus::Running))
            .unwrap()
            .is_empty(),
        "not indexed yet"
    );
    // The upgrade backfills the indexes.
    let kv = repo.store().reader();
    let fill = dsv::index::backfill_indexes(&*kv).unwrap();
    assert_eq!(fill.ops.len(), 2, "{fill:?}");
    assert_eq!(dsv::index::index_problems(&*kv).unwrap().len(), 2);
    drop(kv);
    repo.store().write(|_| Ok((fill.clone(), ()))).unwrap();
    assert!(dsv::index::index_problems(&*repo.store().reader())
        .unwrap()
        .is_empty());
    let running = repo.tasks(None, Some(TaskStatus::Running)).unwrap();
    assert_eq!(running.len(), 1);
    assert!(running[0].lease.is_none() && running[0].agent.as_ref().unwrap().id.is_empty());
    let never = |_: &AgentInfo| false;
    let ttl = DEFAULT_LEASE_TTL_MS;
    assert!(repo
        .reap_expired_at(hb + ttl, true, &never, ttl)
        .unwrap()
        .is_empty());
    let r = repo
        .reap_expired_at(hb + ttl + 1, true, &never, ttl)
        .unwrap();
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].status, TaskStatus::Queued);
    assert!(r[0].error.as_ref().unwrap().contains("'old'"));
    assert!(dsv::index::index_problems(&*repo.store().reader())
        .unwrap()
        .is_empty());
}

#[test]
fn a_heartbeat_gives_a_run_of_before_leases_a_lease() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repo_on(dir.path(), Box::new(MemKv::new()));
    let t = repo
        .create_task("p", "old", "trainer", None, Default::default())
        .unwrap();
    let a = AgentInfo::new("a", "h", 1).unwrap();
    let t = repo.start_task(&t.id, &a).unwrap();
    let mut v: serde_json::Value = serde_json::to_value(&t).unwrap();
    v.as_object_mut().unwrap().remove("lease");
    repo.store()
        .write(|_| {
            let mut b = Batch::default();
            b.put(
                Cf::App,
                [dsv::keys::TASK, t.id.as_bytes()].concat(),
                serde_json::to_vec(&v).unwrap(),
            );
            Ok((b, ()))
        })
        .unwrap();
    assert!(repo.task(&t.id).unwrap().lease.is_none());
    assert!(!repo.heartbeat_run(&t.id, t.started_ms, "x\n").unwrap());
    let l = repo.task(&t.id).unwrap().lease.unwrap();
    assert_eq!((l.holder, l.ttl_ms), (a.id, DEFAULT_LEASE_TTL_MS));
}

// ---- indexes -------------------------------------------------------------

/// A tiny deterministic generator (xorshift64*): reproducible sequences
/// without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a, T>(&mut self, v: &'a [T]) -> Option<&'a T> {
        (!v.is_empty()).then(|| &v[self.below(v.len())])
    }
}

fn full_scan_tasks(repo: &Repo, project: Option<&str>, status: Option<TaskStatus>) -> Vec<Task> {
    repo.tasks(None, None)
        .unwrap()
        .into_iter()
        .filter(|t| project.is_none_or(|p| t.project == p) && status.is_none_or(|s| t.status == s))
        .collect()
}

const STATUSES: [TaskStatus; 6] = [
    TaskStatus::Draft,
    TaskStatus::Queued,
    TaskStatus::Running,
    TaskStatus::Completed,
    TaskStatus::Failed,
    TaskStatus::Aborted,
];

#[test]
fn indexes_equal_a_rebuild_after_random_operations() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repo_on(dir.path(), Box::new(MemKv::new()));
    let projects = ["p0", "p1", "p2/sub"];
    let tags = ["a", "b", "production", "previous"];
    // Users add and remove plain tags; production moves by promotion only.
    let user_tags = ["a", "b", "previous"];
    let agent = AgentInfo::new("a", "h", 1).unwrap();
    // Triggers: a clone on every completed task of p0, and a promotion on
    // every model (their writes are task and model writes too).
    let template = repo
        .create_task("p0", "tpl", "trainer", None, Default::default())
        .unwrap();
    let base = dsv::Trigger {
        name: "clone".into(),
        on: "task".into(),
        project: Some("p0".into()),
        dataset: None,
        tags: vec![],
        events: vec![],
        statuses: vec!["completed".into()],
        threshold: None,
        action: dsv::Action::Clone {
            task: template.id.clone(),
            overrides: BTreeMap::new(),
            queue: "default".into(),
        },
        single_instance: false,
        cursor: 0,
        created_ms: 0,
    };
    repo.add_trigger(base.clone()).unwrap();
    repo.add_trigger(dsv::Trigger {
        name: "gate".into(),
        on: "model".into(),
        project: None,
        statuses: vec![],
        action: dsv::Action::Promote {
            metric: "acc".into(),
            margin: 0.0,
            lower_is_better: false,
        },
        ..base
    })
    .unwrap();
    let none = |_: &dsv::Model, _: &str, _: &str| None;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut clock = dsv_store::store::now_ms();
    for step in 0..600 {
        clock += 100;
        let tasks = repo.tasks(None, None).unwrap();
        let of = |s: TaskStatus| -> Vec<Task> {
            tasks.iter().filter(|t| t.status == s).cloned().collect()
        };
        let op = rng.below(12);
        let r: dsv::Result<()> = (|| {
            match op {
                0 => {
                    let p = *rng.pick(&projects).unwrap();
                    repo.create_task(p, "m", "trainer", None, Default::default())?;
                }
                1 => {
                    if let Some(t) = rng.pick(&tasks) {
                        repo.clone_task(&t.id, None, &BTreeMap::new())?;
                    }
                }
                2 => {
                    if let Some(t) = rng.pick(&of(TaskStatus::Draft)) {
                        repo.enqueue(&t.id, "default")?;
                    }
                }
                3 => {
                    repo.dequeue_at(&q(), &agent, TTL, clock)?;
                }
                4 => {
                    let mut c = of(TaskStatus::Draft);
                    c.extend(of(TaskStatus::Queued));
                    if let Some(t) = rng.pick(&c) {
                        repo.start_task_at(&t.id, &agent, TTL, clock)?;
                    }
                }
                5 => {
                    if let Some(t) = rng.pick(&of(TaskStatus::Running)) {
                        let run = t.lease.as_ref().map(|l| l.run.clone()).unwrap_or_default();
                        repo.heartbeat_lease(&t.id, &run, "log\n", clock)?;
                    }
                }
                6 => {
                    if let Some(t) = rng.pick(&of(TaskStatus::Running)) {
                        let ok = rng.below(4) != 0;
                        let acc = rng.below(100) as f64 / 100.0;
                        repo.finish_task(
                            &t.id,
                            Finish {
                                status: Some(if ok {
                                    TaskStatus::Completed
                                } else {
                                    TaskStatus::Failed
                                }),
                                metrics: [("acc".to_string(), acc)].into(),
                                model: ok.then(|| ("logistic".to_string(), b"{}".to_vec())),
                                run: t.lease.as_ref().map(|l| l.run.clone()),
                                ..Default::default()
                            },
                        )?;
                    }
                }
                7 => {
                    if let Some(t) = rng.pick(&tasks) {
                        repo.abort_task(&t.id)?;
                    }
                }
                8 => {
                    let requeue = rng.below(2) == 0;
                    repo.reap_expired_at(clock + 2 * TTL, requeue, &|_| false, TTL)?;
                }
                9 => {
                    let models = repo.models(None)?;
                    if let Some(m) = rng.pick(&models) {
                        let add = vec![rng.pick(&user_tags).unwrap().to_string()];
                        let remove = vec![rng.pick(&user_tags).unwrap().to_string()];
                        repo.tag_model(&m.id, &add, &remove)?;
                    }
                }
                10 => {
                    let models = repo.models(None)?;
                    if let Some(m) = rng.pick(&models) {
                        let prod = repo.models_in(Some(&m.project), Some("production"))?;
                        let old = prod
                            .iter()
                            .find(|p| p.id != m.id)
                            .map(|p| p.id.clone())
                            .unwrap_or_default();
                        repo.apply_promotion(&(m.id.clone(), Some(old), String::new()))?;
                    }
                }
                _ => {
                    repo.run_triggers(&none)?;
                }
            }
            Ok(())
        })();
        if let Err(e) = r {
            // Refusals (abort of a finished task, …) are part of the game;
            // nothing else is.
            // A promotion decided against a production model that a
            // manual tag changed is refused too.
            assert!(
                matches!(e, dsv::Error::Invalid(_) | dsv::Error::Conflict(_)),
                "step {step} op {op}: {e}"
            );
        }
        if step % 50 == 49 {
            let kv = repo.store().reader();
            let problems = dsv::index::index_problems(&*kv).unwrap();
            assert!(
                problems.is_empty(),
                "after step {step} (op {op}): {problems:#?}"
            );
        }
    }
    let kv = repo.store().reader();
    assert!(dsv::index::backfill_indexes(&*kv).unwrap().is_empty());
    drop(kv);
    // The sequence exercised every kind of record and status.
    let all = repo.tasks(None, None).unwrap();
    for s in STATUSES {
        assert!(all.iter().any(|t| t.status == s), "no {} task", s.as_str());
    }
    let models = repo.models(None).unwrap();
    assert!(
        models.len() > 5
            && models
                .iter()
                .any(|m| m.tags.iter().any(|t| t == "previous"))
    );
    assert!(
        all.iter()
            .any(|t| t.parent.as_deref() == Some(template.id.as_str())
                && t.status != TaskStatus::Draft),
        "a trigger launched"
    );
    // Index reads equal full scans, in the same (newest first) order.
    for p in projects.iter().map(|p| Some(*p)).chain([None]) {
        for s in STATUSES.iter().map(|s| Some(*s)).chain([None]) {
            assert_eq!(
                repo.tasks(p, s).unwrap(),
                full_scan_tasks(&repo, p, s),
                "{p:?} {s:?}"
            );
        }
        for tag in tags.iter().map(|t| Some(*t)).chain([None]) {
            let want: Vec<_> = models
                .iter()
                .filter(|m| {
                    p.is_none_or(|p| m.project == p)
                        && tag.is_none_or(|t| m.tags.iter().any(|x| x == t))
                })
                .cloned()
                .collect();
            assert_eq!(repo.models_in(p, tag).unwrap(), want, "{p:?} {tag:?}");
        }
    }
    for p in projects {
        let prod = repo.models_in(Some(p), Some("production")).unwrap();
        assert!(prod.len() <= 1, "one production model in {p}: {prod:?}");
    }
}

/// A backend that counts the task and model records read.
#[derive(Clone, Default)]
struct Counting {
    inner: MemKv,
    records: Arc<AtomicUsize>,
}

impl Counting {
    fn note(&self, key: &[u8]) {
        if key.starts_with(dsv::keys::TASK) || key.starts_with(dsv::keys::MODEL) {
            self.records.fetch_add(1, Ordering::SeqCst);
        }
    }
    fn reads(&self) -> usize {
        self.records.load(Ordering::SeqCst)
    }
}

impl KvRead for Counting {
    fn get(&self, cf: Cf, key: &[u8]) -> dsv_store::Result<Option<Vec<u8>>> {
        self.note(key);
        self.inner.get(cf, key)
    }
    fn scan_from(
        &self,
        cf: Cf,
        prefix: &[u8],
        start: &[u8],
        visit: &mut Visitor<'_>,
    ) -> dsv_store::Result<()> {
        self.inner.scan_from(cf, prefix, start, &mut |k, v| {
            self.note(k);
            visit(k, v)
        })
    }
    fn scan_rev(
        &self,
        cf: Cf,
        prefix: &[u8],
        before: &[u8],
        visit: &mut Visitor<'_>,
    ) -> dsv_store::Result<()> {
        self.inner.scan_rev(cf, prefix, before, &mut |k, v| {
            self.note(k);
            visit(k, v)
        })
    }
}

impl KvWrite for Counting {
    fn write(&self, batch: Batch) -> dsv_store::Result<()> {
        self.inner.write(batch)
    }
}

impl Backend for Counting {
    fn open_read(&self) -> dsv_store::Result<Arc<dyn KvRead>> {
        Ok(Arc::new(self.clone()))
    }
    // Transactions go to the in-memory backend (its own snapshot and
    // validation); what the wrapper observes is the store's read view.
    fn transact(&self, body: &mut TxnBody<'_>) -> dsv_store::Result<()> {
        self.inner.transact(body)
    }
    fn change_source(&self) -> dsv_store::Result<Box<dyn dsv_store::txn::ChangeSource>> {
        self.inner.change_source()
    }
}

#[test]
fn hot_lookups_read_only_the_records_they_return() {
    let dir = tempfile::tempdir().unwrap();
    let kv = Counting::default();
    let repo = repo_on(dir.path(), Box::new(kv.clone()));
    for i in 0..200 {
        repo.create_task(
            if i % 2 == 0 { "big" } else { "other" },
            "m",
            "trainer",
            None,
            Default::default(),
        )
        .unwrap();
    }
    let a = AgentInfo::new("a", "h", 1).unwrap();
    let mut model_ids = Vec::new();
    for _ in 0..3 {
        let t = queued(&repo, "small");
        repo.start_task(&t.id, &a).unwrap();
    }
    for t in repo
        .tasks(None, Some(TaskStatus::Running))
        .unwrap()
        .into_iter()
        .take(2)
    {
        let done = repo
            .finish_task(
                &t.id,
                Finish {
                    status: Some(TaskStatus::Completed),
                    model: Some(("logistic".into(), b"{}".to_vec())),
                    ..Default::default()
                },
            )
            .unwrap();
        model_ids.push(done.models[0].clone());
    }
    repo.tag_model(&model_ids[0], &["production".into()], &[])
        .unwrap();

    let before = kv.reads();
    let running = repo.tasks(None, Some(TaskStatus::Running)).unwrap();
    assert_eq!(running.len(), 1);
    assert_eq!(kv.reads() - before, 1, "reads only the running task");

    let before = kv.reads();
    assert!(repo.reap_expired(true, &|_| false).unwrap().is_empty());
    assert_eq!(kv.reads() - before, 1, "reaping reads only running tasks");

    let before = kv.reads();
    assert_eq!(repo.tasks(Some("small"), None).unwrap().len(), 3);
    assert_eq!(kv.reads() - before, 3, "reads only the project's tasks");

    let before = kv.reads();
    let prod = repo.models(Some("production")).unwrap();
    assert_eq!(
        prod.iter().map(|m| m.id.clone()).collect::<Vec<_>>(),
        vec![model_ids[0].clone()]
    );
    assert_eq!(kv.reads() - before, 1, "reads only the tagged model");

    // Equality with a full scan (which reads everything).
    let before = kv.reads();
    let all = repo.tasks(None, None).unwrap();
    assert!(kv.reads() - before >= 203);
    let want: Vec<Task> = all.into_iter().filter(|t| t.project == "small").collect();
    assert_eq!(repo.tasks(Some("small"), None).unwrap(), want);
}

#[test]
fn an_index_entry_without_its_record_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repo_on(dir.path(), Box::new(MemKv::new()));
    let t = queued(&repo, "p");
    repo.store()
        .write(|_| {
            let mut b = Batch::default();
            b.delete(Cf::App, [dsv::keys::TASK, t.id.as_bytes()].concat());
            Ok((b, ()))
        })
        .unwrap();
    let e = repo.tasks(None, Some(TaskStatus::Queued)).unwrap_err();
    assert!(e.is_repository_problem());
    let s = e.to_string();
    assert!(s.contains("index ts/queued") && s.contains(&t.id), "{s}");
    let kv = repo.store().reader();
    let problems = dsv::index::index_problems(&*kv).unwrap();
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(problems
        .iter()
        .all(|p| p.starts_with("stale") && p.contains(&t.id)));
    drop(kv);
    assert_eq!(repo.rebuild_indexes().unwrap(), 2);
    assert_eq!(repo.rebuild_indexes().unwrap(), 0, "idempotent");
    assert!(repo.index_problems().unwrap().is_empty());
    assert!(repo
        .tasks(None, Some(TaskStatus::Queued))
        .unwrap()
        .is_empty());
}

type Hook = Arc<std::sync::Mutex<Option<Box<dyn FnOnce() + Send>>>>;

/// A backend that runs a hook once, right after a read of a task record
/// (returning what it read before the hook ran) once `skip` such reads
/// went by: another process acting between a reader's look and its write.
#[derive(Clone, Default)]
struct Interleaved {
    inner: MemKv,
    hook: Hook,
    skip: Arc<AtomicUsize>,
}

impl KvRead for Interleaved {
    fn get(&self, cf: Cf, key: &[u8]) -> dsv_store::Result<Option<Vec<u8>>> {
        let seen = self.inner.get(cf, key)?;
        self.after_read(key);
        Ok(seen)
    }
    fn scan_from(
        &self,
        cf: Cf,
        prefix: &[u8],
        start: &[u8],
        visit: &mut Visitor<'_>,
    ) -> dsv_store::Result<()> {
        self.inner.scan_from(cf, prefix, start, visit)
    }
    fn scan_rev(
        &self,
        cf: Cf,
        prefix: &[u8],
        before: &[u8],
        visit: &mut Visitor<'_>,
    ) -> dsv_store::Result<()> {
        self.inner.scan_rev(cf, prefix, before, visit)
    }
}

/// A transaction's reads through an [`Interleaved`] backend: the hook fires
/// on them too (another process acting while the transaction runs; the
/// in-memory backend's validation then sees it).
struct Through<'a> {
    kv: &'a dyn KvRead,
    on: &'a Interleaved,
}

impl KvRead for Through<'_> {
    fn get(&self, cf: Cf, key: &[u8]) -> dsv_store::Result<Option<Vec<u8>>> {
        let seen = self.kv.get(cf, key)?;
        self.on.after_read(key);
        Ok(seen)
    }
    fn scan_from(
        &self,
        cf: Cf,
        prefix: &[u8],
        start: &[u8],
        visit: &mut Visitor<'_>,
    ) -> dsv_store::Result<()> {
        self.kv.scan_from(cf, prefix, start, visit)
    }
    fn scan_rev(
        &self,
        cf: Cf,
        prefix: &[u8],
        before: &[u8],
        visit: &mut Visitor<'_>,
    ) -> dsv_store::Result<()> {
        self.kv.scan_rev(cf, prefix, before, visit)
    }
}

impl Interleaved {
    fn after_read(&self, key: &[u8]) {
        if key.starts_with(dsv::keys::TASK)
            && self
                .skip
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_err()
        {
            let hook = self.hook.lock().unwrap().take();
            if let Some(h) = hook {
                h();
            }
        }
    }
}

impl KvWrite for Interleaved {
    fn write(&self, batch: Batch) -> dsv_store::Result<()> {
        self.inner.write(batch)
    }
}

impl Backend for Interleaved {
    fn open_read(&self) -> dsv_store::Result<Arc<dyn KvRead>> {
        Ok(Arc::new(self.clone()))
    }
    fn transact(&self, body: &mut TxnBody<'_>) -> dsv_store::Result<()> {
        self.inner
            .transact(&mut |kv| body(&Through { kv, on: self }))
    }
    fn change_source(&self) -> dsv_store::Result<Box<dyn dsv_store::txn::ChangeSource>> {
        self.inner.change_source()
    }
}

#[test]
fn a_renewal_between_a_reapers_look_and_its_write_wins() {
    let dir = tempfile::tempdir().unwrap();
    let kv = Interleaved::default();
    let repo = Arc::new(repo_on(dir.path(), Box::new(kv.clone())));
    queued(&repo, "p");
    let a = AgentInfo::new("a", "h", 1).unwrap();
    let t0 = 6_000_000;
    let t = repo.dequeue_at(&q(), &a, TTL, t0).unwrap().unwrap();
    let run = t.lease.clone().unwrap().run;
    // The reaper sees the lease expired; before it writes, the run renews.
    let (r, id, run2) = (repo.clone(), t.id.clone(), run.clone());
    *kv.hook.lock().unwrap() = Some(Box::new(move || {
        let beat = r.heartbeat_lease(&id, &run2, "", t0 + TTL + 5).unwrap();
        assert_eq!(beat, Beat::Continue);
    }));
    let reaped = repo
        .reap_expired_at(t0 + TTL + 1, true, &|_| false, TTL)
        .unwrap();
    assert!(kv.hook.lock().unwrap().is_none(), "the renewal ran");
    assert!(reaped.is_empty(), "{reaped:?}");
    let now = repo.task(&t.id).unwrap();
    assert_eq!(now.status, TaskStatus::Running);
    assert_eq!(now.lease.unwrap().expires_ms, t0 + 2 * TTL + 5);
    assert_eq!(
        repo.heartbeat_lease(&t.id, &run, "", t0 + TTL + 6).unwrap(),
        Beat::Continue
    );
}

#[test]
fn a_store_stall_does_not_count_against_a_lease() {
    let dir = tempfile::tempdir().unwrap();
    let kv = Interleaved::default();
    let repo = repo_on(dir.path(), Box::new(kv.clone()));
    queued(&repo, "p");
    let a = AgentInfo::new("a", "h", 1).unwrap();
    let t0 = 7_000_000;
    repo.dequeue_at(&q(), &a, TTL, t0).unwrap().unwrap();
    // The store's stall records, as the store would report them.
    let records: Arc<std::sync::Mutex<Vec<(i64, i64)>>> = Default::default();
    let stalls = |from: i64, to: i64| -> dsv::Result<i64> {
        Ok(dsv_store::txn::overlap_ms(
            &records.lock().unwrap(),
            from,
            to,
        ))
    };
    let never = |_: &AgentInfo| false;
    // A 60-ttl gc held the store from just after the renewal: nobody could
    // renew. Looked at 30 ttl's later, the lease has lived only 1 ms.
    records.lock().unwrap().push((t0 + 1, t0 + 60 * TTL));
    let now = t0 + 30 * TTL;
    assert!(repo
        .reap_expired_with(now, true, &never, TTL, &stalls)
        .unwrap()
        .is_empty());
    // After the stall, the lease runs its remaining ttl.
    let end = t0 + 60 * TTL;
    assert!(repo
        .reap_expired_with(end + TTL - 1, true, &never, TTL, &stalls)
        .unwrap()
        .is_empty());
    assert_eq!(
        repo.reap_expired_with(end + TTL + 1, true, &never, TTL, &stalls)
            .unwrap()
            .len(),
        1
    );
    // A stall that ends between a reaper's look and its write (the reaper
    // looked while the gc ran, before the stall was recorded) keeps the
    // lease: the write judges again with the stalls known then.
    let t = repo
        .dequeue_at(&q(), &a, TTL, end + 2 * TTL)
        .unwrap()
        .unwrap();
    assert_eq!(t.status, TaskStatus::Running);
    let start = end + 2 * TTL;
    let look = start + 5 * TTL;
    let recs = records.clone();
    // Fires at the write's read of the record, after the look's.
    kv.skip.store(1, Ordering::SeqCst);
    *kv.hook.lock().unwrap() = Some(Box::new(move || {
        recs.lock().unwrap().push((start + 10, look + 1));
    }));
    assert!(repo
        .reap_expired_with(look, true, &never, TTL, &stalls)
        .unwrap()
        .is_empty());
    assert!(kv.hook.lock().unwrap().is_none(), "the stall was recorded");
    assert_eq!(repo.task(&t.id).unwrap().status, TaskStatus::Running);
}
