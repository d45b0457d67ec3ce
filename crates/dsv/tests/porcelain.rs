//! Porcelain semantics on the in-memory backend: the event log is
//! gap-free and written with each change, a crash at any write of a
//! labeling session leaves the old or the new state, and ClearML-style
//! `get` behaves as documented.

use std::path::Path;

use dsv::{CreateOptions, EventKind, GetQuery, Got, Repo, SyncOptions};
use dsv_store::kv::{CrashingKv, MemKv};
use dsv_store::{RepoConfig, Store, StoreOptions};

fn repo_on(dir: &Path, backend: Box<dyn dsv_store::kv::Backend>) -> Repo {
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

fn write(dir: &Path, name: &str, body: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(name), body).unwrap();
}

#[test]
fn every_mutation_appends_numbered_events() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = repo_on(tmp.path(), Box::new(MemKv::new()));
    let data = tmp.path().join("data");
    write(&data, "a.csv", "x\n1\n");
    let v1 = repo
        .sync("p", "d", &data, &SyncOptions::default())
        .unwrap()
        .version
        .unwrap();
    write(&data, "b.csv", "x\n2\n");
    let v2 = repo
        .sync("p", "d", &data, &SyncOptions::default())
        .unwrap()
        .version
        .unwrap();
    repo.tag(&v2, &["production".into()], &[]).unwrap();
    repo.delete(&v2, false).unwrap();
    let evs = repo.events_after(0, 100).unwrap();
    let kinds: Vec<EventKind> = evs.iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        vec![
            EventKind::DatasetCreated,
            EventKind::VersionFinalized,
            EventKind::VersionFinalized,
            EventKind::VersionTagged,
            EventKind::VersionDeleted
        ]
    );
    let seqs: Vec<u64> = evs.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, vec![1, 2, 3, 4, 5]);
    assert_eq!(evs[1].version_id.as_deref(), Some(v1.id.to_hex().as_str()));
    assert_eq!(evs[3].tags_added, vec!["production".to_string()]);
    assert_eq!(repo.last_event().unwrap(), 5);
    assert_eq!(repo.events_after(3, 100).unwrap().len(), 2);
    assert_eq!(repo.events_after(0, 2).unwrap().len(), 2);
}

#[test]
fn a_crash_at_any_write_leaves_the_old_or_the_new_state() {
    // Count the writes of a full session, then crash at each one.
    let session = |repo: &Repo, data: &Path| -> dsv::Result<()> {
        let d = repo.writable_copy_or_create("p", "d", &CreateOptions::default())?;
        repo.add(&d, &[data.to_path_buf()], &Default::default())?;
        repo.finalize(&d)?;
        Ok(())
    };
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    write(&data, "a.csv", "x\n1\n");
    let probe = CrashingKv::new(MemKv::new(), usize::MAX);
    let repo = repo_on(&tmp.path().join("probe"), Box::new(probe.clone()));
    let before = probe.attempted();
    session(&repo, &data).unwrap();
    let writes = probe.attempted() - before;
    assert!(writes >= 3, "create, add, finalize: {writes} writes");
    for fail_at in 0..writes {
        let dir = tmp.path().join(format!("crash-{fail_at}"));
        let kv = MemKv::new();
        let crashing = CrashingKv::new(kv.clone(), usize::MAX);
        let repo = repo_on(&dir, Box::new(crashing));
        let base = repo.last_event().unwrap();
        // A fresh wrapper over the same memory that fails at write `fail_at`.
        let crashing = CrashingKv::new(kv.clone(), fail_at);
        let repo2 = Repo::from_store(
            Store::open_with_backend(
                &dir.join(".dsv"),
                Box::new(crashing),
                StoreOptions::default(),
            )
            .unwrap(),
        );
        assert!(session(&repo2, &data).is_err());
        // Reopen without failures: no version, and no finalize event.
        let repo3 = Repo::from_store(
            Store::open_with_backend(
                &dir.join(".dsv"),
                Box::new(kv.clone()),
                StoreOptions::default(),
            )
            .unwrap(),
        );
        assert!(repo3.list(None, None, &[]).unwrap().is_empty());
        let evs = repo3.events_after(base, 100).unwrap();
        assert!(evs.iter().all(|e| e.kind != EventKind::VersionFinalized));
        assert!(repo3
            .store()
            .verify(Default::default(), &dsv_store::NoProgress)
            .unwrap()
            .ok());
        drop(repo);
    }
}

#[test]
fn get_follows_clearml_semantics() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = repo_on(tmp.path(), Box::new(MemKv::new()));
    let q = |tags: &[&str]| GetQuery {
        project: Some("p".into()),
        name: Some("d".into()),
        tags: tags.iter().map(|t| t.to_string()).collect(),
        only_finalized: true,
        ..Default::default()
    };
    // Missing without auto_create: an error naming the dataset.
    let e = repo.get(&q(&[])).unwrap_err().to_string();
    assert!(e.contains("p/d"), "{e}");
    // auto_create gives an empty draft.
    let got = repo
        .get(&GetQuery {
            auto_create: true,
            ..q(&[])
        })
        .unwrap();
    let Got::Draft(d) = got else {
        panic!("expected a draft")
    };
    assert_eq!(d.file_count, 0);
    let data = tmp.path().join("data");
    write(&data, "a.csv", "x\n1\n");
    repo.add(&d, std::slice::from_ref(&data), &Default::default())
        .unwrap();
    let v1 = repo.finalize(&d).unwrap();
    assert_eq!(v1.version, "1.0.0");
    // An explicit higher version, then an auto one: newest semver wins.
    let d2 = repo
        .create(
            "p",
            "d",
            &CreateOptions {
                parents: vec![v1.id],
                version: Some("2.0.0".into()),
                tags: vec!["gold".into()],
                ..Default::default()
            },
        )
        .unwrap();
    let v2 = repo.finalize(&d2).unwrap();
    let Got::Version(latest) = repo.get(&q(&[])).unwrap() else {
        panic!()
    };
    assert_eq!(latest.id, v2.id);
    let Got::Version(gold) = repo.get(&q(&["gold"])).unwrap() else {
        panic!()
    };
    assert_eq!(gold.id, v2.id);
    assert!(repo.get(&q(&["silver"])).is_err());
    // A writable copy is a draft whose parent is the version found.
    let Got::Draft(w) = repo
        .get(&GetQuery {
            writable_copy: true,
            ..q(&[])
        })
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(w.parents, vec![v2.id]);
    assert_eq!(w.file_count, 1);
    let v3 = repo.finalize(&w).unwrap();
    assert_eq!(v3.version, "2.0.1", "auto version bumps the highest");
    // Not only_finalized: an open draft newer than every version is returned.
    let open = repo.writable_copy(&v3).unwrap();
    let Got::Draft(found) = repo
        .get(&GetQuery {
            only_finalized: false,
            ..q(&[])
        })
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(found.id, open.id);
}

/// A trainer task, queued and started by an agent of this process.
fn running_task(repo: &Repo) -> dsv::Task {
    let t = repo
        .create_task("p", "m", "trainer", None, Default::default())
        .unwrap();
    let agent = dsv::AgentInfo {
        name: "a".into(),
        host: "h".into(),
        pid: std::process::id(),
    };
    repo.enqueue(&t.id, "default").unwrap();
    repo.start_task(&t.id, &agent).unwrap()
}

/// Finishes a trainer task with a model, `metrics` and the given inputs.
fn trained(repo: &Repo, inputs: &[&str], metrics: &[(&str, f64)]) -> String {
    let t = running_task(repo);
    let done = repo
        .finish_task(
            &t.id,
            dsv::Finish {
                status: Some(dsv::TaskStatus::Completed),
                metrics: metrics.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
                inputs: inputs.iter().map(|s| s.to_string()).collect(),
                model: Some(("logistic".into(), b"{}".to_vec())),
                ..Default::default()
            },
        )
        .unwrap();
    done.models[0].clone()
}

#[test]
fn promotion_compares_in_the_metric_direction_and_evaluates_what_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repo_on(dir.path(), Box::new(MemKv::default()));
    let (train, eval) = ("aa".repeat(32), "bb".repeat(32));
    let inputs = [train.as_str(), eval.as_str()];
    // Production predates log_loss: only accuracy was stored.
    let old = trained(&repo, &inputs, &[("test/accuracy", 0.90)]);
    let none = |_: &dsv::Model, _: &str, _: &str| None;
    let d = repo
        .promotion_decision(&old, "test/accuracy", 0.0, false, &none)
        .unwrap();
    assert!(repo.apply_promotion(&d).unwrap());
    let new = trained(
        &repo,
        &inputs,
        &[("test/accuracy", 0.95), ("test/log_loss", 0.10)],
    );
    // Without an evaluator the missing figure cannot be compared.
    let d = repo
        .promotion_decision(&new, "test/log_loss", 0.0, true, &none)
        .unwrap();
    assert!(
        d.1.is_none() && d.2.contains("could not be evaluated"),
        "{d:?}"
    );
    // Production is evaluated on the same data for the metric it lacks.
    let asked = std::cell::RefCell::new(Vec::new());
    let eval_fn = |m: &dsv::Model, ev: &str, metric: &str| {
        asked
            .borrow_mut()
            .push((m.id.clone(), ev.to_string(), metric.to_string()));
        Some(0.30)
    };
    let d = repo
        .promotion_decision(&new, "test/log_loss", 0.0, true, &eval_fn)
        .unwrap();
    assert_eq!(d.1.as_deref(), Some(old.as_str()), "{d:?}");
    assert!(
        d.2.contains("< production 0.3000") && d.2.contains("lower is better"),
        "{}",
        d.2
    );
    assert_eq!(
        asked.borrow().as_slice(),
        [(old.clone(), eval.clone(), "test/log_loss".to_string())]
    );
    // Read higher-is-better, the smaller loss loses; a stored metric is used
    // as is, without evaluating.
    let d = repo
        .promotion_decision(&new, "test/log_loss", 0.0, false, &eval_fn)
        .unwrap();
    assert!(d.1.is_none() && d.2.starts_with("not promoted"), "{d:?}");
    asked.borrow_mut().clear();
    let d = repo
        .promotion_decision(&new, "test/accuracy", 0.06, false, &eval_fn)
        .unwrap();
    assert!(
        d.1.is_none(),
        "0.95 does not beat 0.90 by more than 0.06: {d:?}"
    );
    assert!(asked.borrow().is_empty());

    // Two gates deciding at once: `new` was promoted over `old`, and a
    // decision made before that (against `old`) is applied afterwards.
    let d = repo
        .promotion_decision(&new, "test/log_loss", 0.0, true, &eval_fn)
        .unwrap();
    let third = trained(&repo, &inputs, &[("test/accuracy", 0.97)]);
    let stale = (third.clone(), Some(old.clone()), String::new());
    assert!(repo.apply_promotion(&d).unwrap());
    assert!(repo.apply_promotion(&stale).unwrap());
    let production: Vec<String> = repo
        .models(Some("production"))
        .unwrap()
        .into_iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(
        production,
        std::slice::from_ref(&third),
        "one production model per project"
    );
    assert!(repo
        .model(&new)
        .unwrap()
        .tags
        .contains(&"previous".to_string()));
}

#[test]
fn a_record_that_does_not_decode_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repo_on(dir.path(), Box::new(MemKv::default()));
    repo.create_task("p", "ok", "trainer", None, Default::default())
        .unwrap();
    repo.store()
        .write(|_| {
            let mut b = dsv_store::kv::Batch::default();
            b.put(
                dsv_store::Cf::App,
                b"tk/0123abcd".to_vec(),
                b"{not json".to_vec(),
            );
            Ok((b, ()))
        })
        .unwrap();
    let e = repo.tasks(None, None).unwrap_err().to_string();
    assert!(e.contains("task 0123abcd"), "{e}");
}

#[test]
fn a_run_that_was_given_up_cannot_report() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repo_on(dir.path(), Box::new(MemKv::default()));
    let t = running_task(&repo);
    let current = t.started_ms.unwrap();
    let stale = Some(current - 1);
    // A stale run is told to stop, and its log is not kept.
    assert!(repo.heartbeat_run(&t.id, stale, "old run\n").unwrap());
    assert!(!repo
        .heartbeat_run(&t.id, Some(current), "current run\n")
        .unwrap());
    let e = repo
        .finish_task(
            &t.id,
            dsv::Finish {
                status: Some(dsv::TaskStatus::Completed),
                run_started_ms: stale,
                ..Default::default()
            },
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("started again") && e.contains("dropped"), "{e}");
    assert_eq!(repo.task(&t.id).unwrap().status, dsv::TaskStatus::Running);
    let log = repo.task_log(&t.id).unwrap();
    assert!(
        log.contains("current run") && !log.contains("old run"),
        "{log}"
    );
    let done = repo
        .finish_task(
            &t.id,
            dsv::Finish {
                status: Some(dsv::TaskStatus::Completed),
                run_started_ms: Some(current),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(done.status, dsv::TaskStatus::Completed);
}
