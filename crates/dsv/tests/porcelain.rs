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
    // By version string, narrowed by tags.
    let by = |version: &str, tags: &[&str]| {
        repo.get(&GetQuery {
            version: Some(version.into()),
            ..q(tags)
        })
    };
    let Got::Version(one) = by("1.0.0", &[]).unwrap() else {
        panic!()
    };
    assert_eq!(one.id, v1.id);
    let Got::Version(two) = by("2.0.0", &["gold"]).unwrap() else {
        panic!()
    };
    assert_eq!(two.id, v2.id);
    assert!(by("1.0.0", &["gold"]).is_err(), "1.0.0 is not gold");
    assert!(by("9.9.9", &[]).is_err());
    assert!(by("2.0.0+b", &[]).is_err(), "the exact string, as stored");
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
    let agent = dsv::AgentInfo::new("a", "h", std::process::id()).unwrap();
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
    // The stale decision is refused (it would replace `new`, which it never
    // compared against) and changes nothing; deciding again compares with
    // `new`.
    let err = repo.apply_promotion(&stale).unwrap_err();
    assert!(
        matches!(&err, dsv::Error::Conflict(w) if w.contains("production model")),
        "{err}"
    );
    let production: Vec<String> = repo
        .models(Some("production"))
        .unwrap()
        .into_iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(
        production,
        std::slice::from_ref(&new),
        "one production model per project, the one the last valid decision chose"
    );
    assert!(!repo
        .model(&third)
        .unwrap()
        .tags
        .contains(&"production".to_string()));
    assert!(repo
        .model(&old)
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

#[test]
fn latest_is_the_version_finalized_last_not_the_highest_string() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = repo_on(tmp.path(), Box::new(MemKv::new()));
    let data = tmp.path().join("data");
    write(&data, "a.csv", "x\n1\n");
    let sync = |version: Option<&str>| {
        repo.sync(
            "p",
            "d",
            &data,
            &SyncOptions {
                version: version.map(String::from),
                ..Default::default()
            },
        )
    };
    let v1 = sync(None).unwrap().version.unwrap();
    assert_eq!(v1.version, "1.0.0");
    // A lower explicit version, finalized after 1.0.0, is the newest.
    write(&data, "b.csv", "x\n2\n");
    let low = sync(Some("0.9.0")).unwrap().version.unwrap();
    assert_eq!(low.parents, vec![v1.id]);
    assert_eq!(repo.resolve("p/d").unwrap().id, low.id);
    let ds = repo.dataset("p", "d").unwrap().unwrap();
    assert_eq!(repo.latest(&ds).unwrap().unwrap().id, low.id);
    assert_eq!(repo.versions(&ds).unwrap()[0].id, low.id);
    assert_eq!(repo.list(Some("p"), None, &[]).unwrap()[0].id, low.id);
    // `--from-latest` starts from it: no file is dropped.
    let d = repo
        .writable_copy_or_create("p", "d", &CreateOptions::default())
        .unwrap();
    assert_eq!(d.parents, vec![low.id]);
    assert_eq!(d.file_count, 2);
    repo.discard(&d).unwrap();
    // `sync` of the same folder: nothing changed against the newest.
    let same = sync(None).unwrap();
    assert!(same.version.is_none());
    assert_eq!(same.unchanged_from, Some(low.id));
    // The auto version is the next patch above the highest, never a
    // number that exists.
    write(&data, "c.csv", "x\n3\n");
    let v3 = sync(None).unwrap().version.unwrap();
    assert_eq!(v3.version, "1.0.1");
    assert_eq!(v3.parents, vec![low.id]);
    assert_eq!(v3.file_count, 3);
    assert_eq!(repo.resolve("p/d").unwrap().id, v3.id);
}

#[test]
fn version_strings_are_new_semantic_versions() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = repo_on(tmp.path(), Box::new(MemKv::new()));
    let data = tmp.path().join("data");
    write(&data, "a.csv", "x\n1\n");
    let sync = |version: &str| {
        repo.sync(
            "p",
            "d",
            &data,
            &SyncOptions {
                version: Some(version.into()),
                ..Default::default()
            },
        )
    };
    for bad in ["banana", "1.0", "v1.0.0", "1.0.0.0", ""] {
        let e = sync(bad).unwrap_err();
        assert!(matches!(e, dsv::Error::Invalid(_)), "{bad}: {e:?}");
        assert!(
            e.to_string().contains(&format!("'{bad}'"))
                && e.to_string().contains("semantic version"),
            "{e}"
        );
        let e = repo
            .create(
                "p",
                "d",
                &CreateOptions {
                    version: Some(bad.into()),
                    auto_create: true,
                    ..Default::default()
                },
            )
            .unwrap_err();
        assert!(matches!(e, dsv::Error::Invalid(_)), "{bad}: {e:?}");
    }
    assert!(repo.dataset("p", "d").unwrap().is_none(), "nothing written");
    sync("2.0.0").unwrap().version.unwrap();
    // An existing version, also spelled with build metadata, is refused.
    write(&data, "b.csv", "x\n2\n");
    for taken in ["2.0.0", "2.0.0+build.7"] {
        let e = sync(taken).unwrap_err();
        assert!(
            matches!(e, dsv::Error::VersionExists { .. }),
            "{taken}: {e:?}"
        );
        let e = repo
            .create(
                "p",
                "d",
                &CreateOptions {
                    version: Some(taken.into()),
                    ..Default::default()
                },
            )
            .unwrap_err();
        assert!(
            matches!(e, dsv::Error::VersionExists { .. }),
            "{taken}: {e:?}"
        );
    }
    assert_eq!(
        sync("2.1.0-rc.1").unwrap().version.unwrap().version,
        "2.1.0-rc.1"
    );
}

/// Deletes a file when hashing starts: after the folder was listed, before
/// its files are read (deterministically, without timing).
struct DeleteOnHashing(std::path::PathBuf);

impl dsv_store::Progress for DeleteOnHashing {
    fn start(&self, phase: &str, _total: u64) {
        if phase == "hashing" && self.0.exists() {
            std::fs::remove_file(&self.0).unwrap();
        }
    }
}

#[test]
fn a_file_vanishing_during_sync_or_add_is_an_error_and_nothing_is_stored() {
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
    write(&data, "gone.csv", "x\n3\n");
    let gone = data.join("gone.csv");
    let hook = DeleteOnHashing(gone.clone());
    let e = repo
        .sync(
            "p",
            "d",
            &data,
            &SyncOptions {
                progress: Some(&hook),
                ..Default::default()
            },
        )
        .unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("gone.csv") && msg.contains("vanished"),
        "{msg}"
    );
    assert!(!gone.exists(), "the hook ran");
    assert_eq!(repo.resolve("p/d").unwrap().id, v1.id, "nothing committed");
    // Running again is safe: the folder as it is now.
    let v2 = repo
        .sync("p", "d", &data, &SyncOptions::default())
        .unwrap()
        .version
        .unwrap();
    assert_eq!(v2.file_count, 2);

    // `add` to a draft: the same, and the draft is unchanged.
    let d = repo.writable_copy(&v2).unwrap();
    write(&data, "c.csv", "x\n4\n");
    write(&data, "gone.csv", "x\n5\n");
    let e = repo
        .add(
            &d,
            std::slice::from_ref(&data),
            &dsv::AddOptions {
                progress: Some(&hook),
                ..Default::default()
            },
        )
        .unwrap_err();
    assert!(e.to_string().contains("gone.csv"), "{e}");
    assert_eq!(repo.draft(&d.id).unwrap().file_count, 2);
    let r = repo
        .add(&d, std::slice::from_ref(&data), &Default::default())
        .unwrap();
    assert_eq!(r.added, vec!["c.csv".to_string()]);
}

#[test]
fn a_version_tasks_or_models_reference_is_not_deleted_and_gc_keeps_it() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = repo_on(tmp.path(), Box::new(MemKv::new()));
    let data = tmp.path().join("data");
    write(&data, "a.csv", "x\n1\n");
    let sync = || {
        repo.sync("p", "d", &data, &SyncOptions::default())
            .unwrap()
            .version
            .unwrap()
    };
    let v1 = sync();
    write(&data, "a.csv", "x\n2\n");
    let v2 = sync();
    write(&data, "a.csv", "x\n3\n");
    let v3 = sync();
    write(&data, "a.csv", "x\n4\n");
    let v4 = sync();
    // v1: pinned by a draft task's parameter (by version string).
    let params = [("General/dataset_id".to_string(), "p/d@1.0.0".to_string())]
        .into_iter()
        .collect();
    let task = repo
        .create_task("p", "train", "trainer", None, params)
        .unwrap();
    // v2: a model's training data (and its task's input).
    let model = trained(&repo, &[&v2.id.to_hex()], &[("test/accuracy", 0.9)]);
    // v3: a floating reference (PROJECT/NAME) pins nothing.
    let float = repo
        .create_task(
            "p",
            "float",
            "trainer",
            None,
            [("General/dataset_id".to_string(), "p/d".to_string())]
                .into_iter()
                .collect(),
        )
        .unwrap();

    let e = repo.delete(&v1, false).unwrap_err();
    assert!(matches!(e, dsv::Error::Referenced { .. }), "{e:?}");
    assert!(
        e.to_string().contains(&task.id[..12]) && e.to_string().contains("General/dataset_id"),
        "{e}"
    );
    let e = repo.delete(&v2, false).unwrap_err().to_string();
    assert!(e.contains(&format!("model {}", &model[..12])), "{e}");
    assert!(e.contains("its input"), "{e}");
    assert_eq!(
        repo.resolve("p/d@1.0.1").unwrap().id,
        v2.id,
        "nothing deleted"
    );
    // v3 is only a parent (of v4): --force deletes it for good.
    repo.delete(&v3, true).unwrap();

    // --force: v2 leaves its dataset, but stays readable by id and gc keeps it.
    repo.delete(&v2, true).unwrap();
    assert!(repo.resolve("p/d@1.0.1").is_err());
    let ds = repo.dataset("p", "d").unwrap().unwrap();
    assert!(repo.versions(&ds).unwrap().iter().all(|v| v.id != v2.id));
    repo.store().gc(Default::default(), false).unwrap();
    let kept = repo.resolve(&v2.id.to_hex()[..10]).unwrap();
    assert!(kept.deleted);
    assert_eq!(kept.version, "1.0.1");
    let mut out = Vec::new();
    repo.cat(&kept, "a.csv", &mut out).unwrap();
    assert_eq!(out, b"x\n2\n");
    assert!(repo.verify(&kept).unwrap().is_empty());
    assert!(repo.delete(&kept, true).is_err(), "already deleted");
    // The unreferenced v3 is gone for good.
    assert!(repo.resolve(&v3.id.to_hex()).is_err());
    // A clone of the model's task still names a readable version.
    let m = repo.model(&model).unwrap();
    assert_eq!(m.datasets, vec![v2.id.to_hex()]);
    // ... but while it runs, the latest version is what it reads.
    let agent = dsv::AgentInfo::new("a", "h", std::process::id()).unwrap();
    repo.start_task(&float.id, &agent).unwrap();
    let e = repo.delete(&v4, false).unwrap_err().to_string();
    assert!(e.contains(&float.id[..12]) && e.contains("running"), "{e}");
}

#[test]
fn a_clone_whose_pinned_version_is_gone_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = repo_on(tmp.path(), Box::new(MemKv::new()));
    let gone = "ab".repeat(32);
    let t = repo
        .create_task(
            "p",
            "m",
            "trainer",
            None,
            [("General/dataset_id".to_string(), gone.clone())]
                .into_iter()
                .collect(),
        )
        .unwrap();
    let e = repo
        .clone_task(&t.id, None, &Default::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("General/dataset_id") && e.contains(&gone) && e.contains("--set"),
        "{e}"
    );
    let data = tmp.path().join("data");
    write(&data, "a.csv", "x\n1\n");
    repo.sync("p", "d", &data, &SyncOptions::default()).unwrap();
    let c = repo
        .clone_task(
            &t.id,
            None,
            &[("General/dataset_id".to_string(), "p/d".to_string())]
                .into_iter()
                .collect(),
        )
        .unwrap();
    assert_eq!(c.params["General/dataset_id"], "p/d");
}

fn params(kv: &[(&str, &str)]) -> std::collections::BTreeMap<String, String> {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn trainer_parameters_are_checked_where_they_are_defined() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = repo_on(tmp.path(), Box::new(MemKv::new()));
    let base = [
        ("General/model", "tree"),
        ("General/label", "Occupancy"),
        ("General/features", "Light,CO2"),
    ];
    // (a) label leakage, (b) a misspelled hyperparameter: refused at create.
    let leak = params(&[
        ("General/label", "Occupancy"),
        ("General/features", "Light,Occupancy"),
    ]);
    let e = repo
        .create_task("p", "m", "trainer", None, leak)
        .unwrap_err()
        .to_string();
    assert!(e.contains("leakage"), "{e}");
    let mut typo = params(&base);
    typo.insert("Model/maxdepth".into(), "3".into());
    let e = repo
        .create_task("p", "m", "trainer", None, typo.clone())
        .unwrap_err()
        .to_string();
    assert!(e.contains("did you mean 'Model/max_depth'"), "{e}");
    assert!(repo.tasks(None, None).unwrap().is_empty(), "nothing stored");
    // A command task's program reads whatever it is given.
    repo.create_task("p", "c", "command", Some("true".into()), typo)
        .unwrap();

    let t = repo
        .create_task("p", "m", "trainer", None, params(&base))
        .unwrap();
    // (d) clone --set and trigger add --set apply the same rule, at
    // definition time: a valid new key is accepted by both ...
    let ok = params(&[("Model/max_depth", "3")]);
    repo.clone_task(&t.id, None, &ok).unwrap();
    let trig = |name: &str, on: &str, overrides: &[(&str, &str)]| dsv::Trigger {
        name: name.into(),
        on: on.into(),
        project: Some("p".into()),
        dataset: None,
        tags: vec![],
        events: vec![],
        statuses: vec![],
        threshold: None,
        action: dsv::Action::Clone {
            task: t.id.clone(),
            overrides: params(overrides),
            queue: String::new(),
        },
        single_instance: false,
        cursor: 0,
        created_ms: 0,
    };
    repo.add_trigger(trig("depth", "dataset", &[("Model/max_depth", "3")]))
        .unwrap();
    // ... an unknown one and leakage are refused by both.
    for bad in [
        [("Model/maxdepth", "3")],
        [("General/features", "Light,Occupancy")],
    ] {
        let e1 = repo
            .clone_task(&t.id, None, &params(&bad))
            .unwrap_err()
            .to_string();
        let e2 = repo
            .add_trigger(trig("bad", "dataset", &bad))
            .unwrap_err()
            .to_string();
        assert_eq!(e1, e2);
    }
    // (c) placeholders the trigger's events cannot fill.
    let e = repo
        .add_trigger(trig(
            "bad",
            "dataset",
            &[("General/dataset_id", "${model.id}")],
        ))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("${model.id}") && e.contains("dataset events") && e.contains("${dataset.id}"),
        "{e}"
    );
    let e = repo
        .add_trigger(trig("bad", "model", &[("User/from", "${dataset.id}")]))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("${dataset.id}") && e.contains("${model.id}"),
        "{e}"
    );
    repo.add_trigger(trig(
        "ok",
        "dataset",
        &[("General/dataset_id", "${dataset.id}")],
    ))
    .unwrap();
    repo.add_trigger(trig(
        "ok2",
        "task",
        &[("User/after", "${task.id} ${model.id}")],
    ))
    .unwrap();
    assert_eq!(repo.triggers().unwrap().len(), 3);
}

#[test]
fn listing_a_project_includes_its_sub_projects() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = repo_on(tmp.path(), Box::new(MemKv::new()));
    let data = tmp.path().join("data");
    write(&data, "a.csv", "x\n1\n");
    let mut ids = std::collections::BTreeMap::new();
    for name in ["a/b", "a/b/c", "a/b/x/y", "a/bc", "z/b"] {
        let (p, n) = name.rsplit_once('/').unwrap();
        let v = repo
            .sync(p, n, &data, &SyncOptions::default())
            .unwrap()
            .version
            .unwrap();
        ids.insert(name, v.id);
    }
    let names = |path: &str| -> Vec<String> {
        let mut v: Vec<String> = repo
            .list_path(path, &[])
            .unwrap()
            .unwrap()
            .iter()
            .map(|v| v.dataset.full_name())
            .collect();
        v.sort();
        v
    };
    // `a/b` is a dataset and a project: both.
    assert_eq!(names("a/b"), ["a/b", "a/b/c", "a/b/x/y"]);
    assert_eq!(names("a"), ["a/b", "a/b/c", "a/b/x/y", "a/bc"]);
    assert_eq!(names("a/b/c"), ["a/b/c"]);
    assert_eq!(names("a/bc/"), ["a/bc"]);
    assert!(repo.list_path("nope", &[]).unwrap().is_none());
    assert!(repo.list_path("a/nope", &[]).unwrap().is_none());
}

#[test]
fn a_placeholder_the_event_does_not_fill_launches_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = repo_on(tmp.path(), Box::new(MemKv::new()));
    let eval = repo
        .create_task(
            "p",
            "eval",
            "command",
            Some("true".into()),
            Default::default(),
        )
        .unwrap();
    repo.add_trigger(dsv::Trigger {
        name: "after".into(),
        on: "task".into(),
        project: Some("p".into()),
        dataset: None,
        tags: vec![],
        events: vec![],
        statuses: vec!["failed".into()],
        threshold: None,
        action: dsv::Action::Clone {
            task: eval.id.clone(),
            overrides: params(&[("Args/model", "${model.id}")]),
            queue: String::new(),
        },
        single_instance: false,
        cursor: 0,
        created_ms: 0,
    })
    .unwrap();
    // A failed task produced no model: `${model.id}` cannot be filled.
    let t = running_task(&repo);
    repo.finish_task(
        &t.id,
        dsv::Finish {
            status: Some(dsv::TaskStatus::Failed),
            error: Some("boom".into()),
            ..Default::default()
        },
    )
    .unwrap();
    let none = |_: &dsv::Model, _: &str, _: &str| None;
    let fired = repo.run_triggers(&none).unwrap();
    assert_eq!(fired.len(), 1);
    assert!(fired[0].task.is_none(), "{:?}", fired[0]);
    assert!(
        fired[0].note.contains("not launched") && fired[0].note.contains("${model.id}"),
        "{}",
        fired[0].note
    );
    assert_eq!(repo.tasks(None, None).unwrap().len(), 2, "no clone");
}

/// The index of versions in finalize order answers `latest`, name
/// resolution and `list -n` exactly as a read of every version does: before
/// it is built (the fallback), once built, after a deletion, with tags.
#[test]
fn the_finalize_order_index_agrees_with_reading_every_version() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = repo_on(tmp.path(), Box::new(MemKv::new()));
    let data = tmp.path().join("data");
    let sync = |name: &str, n: usize, version: Option<&str>, tags: &[&str]| {
        write(&data, &format!("{name}{n}.csv"), &format!("x\n{n}\n"));
        repo.sync(
            "p",
            name,
            &data,
            &SyncOptions {
                version: version.map(String::from),
                tags: tags.iter().map(|t| t.to_string()).collect(),
                ..Default::default()
            },
        )
        .unwrap()
        .version
        .unwrap()
    };
    sync("a", 1, None, &["good"]);
    sync("b", 2, Some("2.0.0"), &[]);
    sync("a", 3, None, &[]);
    // Finalized last, with the lowest version string: still the newest.
    sync("b", 4, Some("0.5.0"), &["good"]);
    let newest_a = sync("a", 5, None, &["good"]);
    let ids = |vs: &[dsv::DatasetVersion]| vs.iter().map(|v| v.id).collect::<Vec<_>>();
    let check = |repo: &Repo| {
        let all = repo.list(Some("p"), None, &[]).unwrap();
        let good = repo.list(Some("p"), None, &["good".to_string()]).unwrap();
        for n in [1, 2, 3, 10] {
            let got = repo.list_limited(Some("p"), None, &[], Some(n)).unwrap();
            assert_eq!(ids(&got), ids(&all[..n.min(all.len())]), "list -n {n}");
            let got = repo
                .list_path_limited("p/a", &["good".to_string()], Some(n))
                .unwrap()
                .unwrap();
            let want: Vec<_> = good
                .iter()
                .filter(|v| v.dataset.name == "a")
                .cloned()
                .collect();
            assert_eq!(ids(&got), ids(&want[..n.min(want.len())]), "tagged -n {n}");
        }
        for name in ["a", "b"] {
            let ds = repo.dataset("p", name).unwrap().unwrap();
            let latest = repo.latest(&ds).unwrap().unwrap();
            assert_eq!(
                latest.id,
                all.iter().find(|v| v.dataset.name == name).unwrap().id
            );
            assert_eq!(repo.resolve(&format!("p/{name}")).unwrap().id, latest.id);
        }
        all
    };
    let before = check(&repo);
    assert_eq!(before[0].id, newest_a.id);
    assert_eq!(before[1].version, "0.5.0");
    // A repository made before the index: its config lacks the feature,
    // which building the index records (older builds then only read).
    let dot = tmp.path().join(".dsv");
    let features = |cfg: &RepoConfig| cfg.features.clone().unwrap_or_default().ro_compat;
    let mut cfg = RepoConfig::load(&dot).unwrap();
    cfg.features
        .as_mut()
        .unwrap()
        .ro_compat
        .retain(|f| f != dsv_store::config::FEATURE_VERSION_ORDER);
    cfg.save(&dot).unwrap();
    assert!(repo.index_version_order().unwrap(), "the index was built");
    assert!(features(&RepoConfig::load(&dot).unwrap())
        .contains(&dsv_store::config::FEATURE_VERSION_ORDER.to_string()));
    assert!(!repo.index_version_order().unwrap(), "built once");
    assert_eq!(ids(&check(&repo)), ids(&before));
    // Deleting the newest version of p/a: the one before it is the latest.
    repo.delete(&newest_a, false).unwrap();
    let after = check(&repo);
    assert_eq!(after.len(), before.len() - 1);
    let ds = repo.dataset("p", "a").unwrap().unwrap();
    assert_eq!(repo.latest(&ds).unwrap().unwrap().version, "1.0.1");
    // A version finalized once the index exists is in it.
    let newest_b = sync("b", 6, None, &["good"]);
    let all = check(&repo);
    assert_eq!(all[0].id, newest_b.id);
    assert_eq!(all.len(), after.len() + 1);
}

/// The index of versions by version string answers the next number, the
/// "already exists" check and `name@version` resolution exactly as a read of every version does: before it is built (the
/// fallback), once built, after a deletion, with pre-releases and build
/// metadata.
#[test]
fn the_version_name_index_agrees_with_reading_every_version() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = repo_on(tmp.path(), Box::new(MemKv::new()));
    let data = tmp.path().join("data");
    let n = std::cell::Cell::new(0);
    let sync = |version: Option<&str>| {
        n.set(n.get() + 1);
        write(&data, &format!("f{}.csv", n.get()), "x\n1\n");
        repo.sync(
            "p",
            "a",
            &data,
            &SyncOptions {
                version: version.map(String::from),
                ..Default::default()
            },
        )
    };
    let built = |repo: &Repo| {
        repo.store()
            .reader()
            .get(dsv_store::kv::Cf::App, b"mk/version-names")
            .unwrap()
            .is_some()
    };
    assert!(!built(&repo), "a store made by hand starts without it");
    let mut made = Vec::new();
    let mut phase = |repo: &Repo, start: &str, pre: &str, auto: &str, taken: &[&str]| {
        let v = sync(None).unwrap().version.unwrap();
        assert_eq!(v.version, start);
        made.push(v);
        // A pre-release above every release: the next number bumps its
        // major.minor.patch.
        made.push(sync(Some(pre)).unwrap().version.unwrap());
        let v = sync(None).unwrap().version.unwrap();
        assert_eq!(v.version, auto);
        made.push(v);
        // Equal precedence is the same version, whatever its build.
        let e = sync(Some(&format!("{pre}+build.7")))
            .unwrap_err()
            .to_string();
        assert!(e.contains(&format!("{pre}+build.7 (as {pre})")), "{e}");
        for t in taken {
            let e = sync(Some(t)).unwrap_err().to_string();
            assert!(e.contains(t), "{e}");
        }
        // Every version string resolves to its own version; a string of
        // equal precedence that is not the stored one names nothing.
        for v in &made {
            let got = repo.resolve(&format!("p/a@{}", v.version)).unwrap();
            assert_eq!(got.id, v.id, "{}", v.version);
        }
        assert!(repo.resolve(&format!("p/a@{pre}+x")).is_err());
        made.clone()
    };
    phase(&repo, "1.0.0", "2.0.0-rc.1", "2.0.1", &["1.0.0", "2.0.1"]);
    // A different pre-release of the same release is free.
    sync(Some("2.0.0-rc.2")).unwrap();
    assert!(
        repo.resolve("p/a@2.0.0").is_err(),
        "only pre-releases of it"
    );
    assert!(repo.index_version_order().unwrap(), "the index was built");
    assert!(built(&repo));
    let made = phase(
        &repo,
        "2.0.2",
        "4.0.0-beta",
        "4.0.1",
        &["1.0.0", "2.0.0-rc.1", "2.0.0-rc.2", "2.0.2"],
    );
    // A deleted version's string is free again and no longer the highest.
    let top = repo.resolve("p/a@4.0.1").unwrap();
    repo.delete(&top, false).unwrap();
    assert!(repo.resolve("p/a@4.0.1").is_err());
    let v = sync(None).unwrap().version.unwrap();
    assert_eq!(v.version, "4.0.1");
    assert_ne!(v.id, top.id);
    // Tags resolve through the index's fallback to tags.
    repo.tag(&made[1], &["good".to_string()], &[]).unwrap();
    assert_eq!(repo.resolve("p/a@good").unwrap().id, made[1].id);
}
