//! `team-bench`: figures of a team repository on PostgreSQL (run by
//! `benches/team.sh`, which starts the database and the object store).
//!
//! ```text
//! team-bench dequeue URL [AGENTS] [TASKS]   # agents (threads, each with its own
//!                                           # connections) drain one queue of no-op tasks
//! team-bench fill DIR VERSIONS EVENTS       # a team machine folder: VERSIONS versions of
//!                                           # one dataset, then events up to EVENTS in all
//! ```
//!
//! The database password comes from `PGPASSWORD`; object-store credentials
//! from `AWS_*`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dsv::task::{AgentInfo, Finish, TaskStatus};
use dsv::Repo;
use dsv_pg::{PgKv, PgOptions};
use dsv_store::{RepoConfig, Store, StoreOptions};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn pg_options() -> PgOptions {
    PgOptions {
        password: std::env::var("PGPASSWORD").ok(),
        application_name: Some("team-bench".into()),
        ..PgOptions::default()
    }
}

fn store_options() -> StoreOptions {
    StoreOptions {
        lock_timeout: Duration::from_secs(120),
        ..StoreOptions::default()
    }
}

fn dequeue(url: &str, agents: usize, tasks: usize) -> Res<()> {
    let dir = tempfile::tempdir()?;
    let dot = dir.path().join(".dsv");
    let repo = Repo::from_store(Store::init_with_backend(
        &dot,
        RepoConfig::default(),
        Box::new(PgKv::connect(url, &pg_options())?),
        store_options(),
    )?);
    let t = Instant::now();
    for _ in 0..tasks {
        let task = repo.create_task(
            "bench",
            "noop",
            "command",
            Some("true".into()),
            BTreeMap::new(),
        )?;
        repo.enqueue(&task.id, "q")?;
    }
    eprintln!(
        "setup: {tasks} tasks created and enqueued in {:.1} s ({:.0}/s, one client)",
        t.elapsed().as_secs_f64(),
        tasks as f64 / t.elapsed().as_secs_f64()
    );
    let repos: Vec<Arc<Repo>> = (0..agents)
        .map(|_| {
            Ok(Arc::new(Repo::from_store(Store::open_with_backend(
                &dot,
                Box::new(PgKv::connect(url, &pg_options())?),
                store_options(),
            )?)))
        })
        .collect::<Res<_>>()?;
    let queues = vec!["q".to_string()];
    let start = Instant::now();
    let results: Vec<(Vec<String>, Vec<Duration>)> = std::thread::scope(|s| {
        let hs: Vec<_> = repos
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let queues = queues.clone();
                s.spawn(move || {
                    let me = AgentInfo::new(format!("bench-{i}"), "bench", i as u32).expect("id");
                    let mut started = Vec::new();
                    let mut at = Vec::new();
                    loop {
                        let now = dsv_store::store::now_ms();
                        match r.dequeue_at(&queues, &me, 60_000, now).expect("dequeue") {
                            Some(t) => {
                                at.push(start.elapsed());
                                r.finish_task(
                                    &t.id,
                                    Finish {
                                        status: Some(TaskStatus::Completed),
                                        ..Finish::default()
                                    },
                                )
                                .expect("finish");
                                started.push(t.id);
                            }
                            None => break,
                        }
                    }
                    (started, at)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("agent")).collect()
    });
    let elapsed = start.elapsed();
    let mut all: Vec<String> = Vec::new();
    let mut times: Vec<Duration> = Vec::new();
    for (ids, at) in results {
        all.extend(ids);
        times.extend(at);
    }
    let distinct: BTreeSet<&String> = all.iter().collect();
    times.sort();
    let last_start = times.last().copied().unwrap_or_default();
    println!(
        "dequeue: {agents} agents, {tasks} no-op tasks: {} started ({} distinct) in {:.2} s = {:.0} tasks/s started (dequeue + finish each; all done in {:.2} s)",
        all.len(),
        distinct.len(),
        last_start.as_secs_f64(),
        all.len() as f64 / last_start.as_secs_f64(),
        elapsed.as_secs_f64()
    );
    if all.len() != tasks || distinct.len() != tasks {
        return Err(format!(
            "{} started, {} distinct, {tasks} queued",
            all.len(),
            distinct.len()
        )
        .into());
    }
    let left = repo.tasks(None, Some(TaskStatus::Queued))?.len();
    let done = repo.tasks(None, Some(TaskStatus::Completed))?.len();
    println!("check: every task once — {done} completed, {left} queued");
    if done != tasks || left != 0 {
        return Err("not every task ran exactly once".into());
    }
    Ok(())
}

fn open_team(dir: &Path) -> Res<Repo> {
    let opts = dsv_remote::team::TeamOptions {
        pg: pg_options(),
        connect: dsv_remote::Connect {
            options: ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"]
                .iter()
                .filter_map(|k| std::env::var(k).ok().map(|v| (k.to_ascii_lowercase(), v)))
                .collect(),
        },
        store: store_options(),
        cache_dir: dir.join("remote-cache"),
        cache_budget: 0,
    };
    Ok(Repo::from_store(dsv_remote::team::open(dir, &opts)?))
}

fn fill(dir: &Path, versions: usize, events: u64) -> Res<()> {
    let repo = open_team(&dir.join(".dsv"))?;
    let work = dir.join("work");
    std::fs::create_dir_all(&work)?;
    for f in 0..20 {
        std::fs::write(work.join(format!("file-{f:02}.csv")), format!("x\n{f}\n"))?;
    }
    let t = Instant::now();
    let have = repo
        .dataset("bench", "many")?
        .map(|ds| repo.version_headers(&ds).map(|v| v.len()))
        .transpose()?
        .unwrap_or(0);
    for i in have..versions {
        std::fs::write(
            work.join(format!("file-{:02}.csv", i % 20)),
            format!("x\n{i}\nedit\n"),
        )?;
        repo.sync("bench", "many", &work, &dsv::SyncOptions::default())?;
        if (i + 1) % 5000 == 0 {
            eprintln!(
                "{} versions, {:.0} s ({:.0}/s)",
                i + 1,
                t.elapsed().as_secs_f64(),
                (i + 1 - have) as f64 / t.elapsed().as_secs_f64()
            );
        }
    }
    // Synthetic task events up to `events`, 10,000 per transaction.
    let t = Instant::now();
    loop {
        let last = repo.last_event()?;
        if last >= events {
            break;
        }
        let n = (events - last).min(10_000);
        repo.store().write(|kv| {
            let mut w = dsv::events::EventWriter::new(kv)
                .map_err(|e| dsv_store::Error::Kv(e.to_string()))?;
            let mut b = dsv_store::Batch::default();
            for _ in 0..n {
                let mut ev = dsv::Event::new(dsv::EventKind::TaskStatus);
                ev.project = "bench".into();
                ev.name = "noop".into();
                ev.extra
                    .insert("status".into(), serde_json::Value::from("completed"));
                w.push(&mut b, ev);
            }
            Ok((b, ()))
        })?;
    }
    println!(
        "filled: {} versions, {} events (events added in {:.1} s)",
        versions,
        repo.last_event()?,
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: team-bench dequeue URL [AGENTS] [TASKS] | fill DIR VERSIONS EVENTS";
    match args.get(1).map(String::as_str) {
        Some("dequeue") => dequeue(
            args.get(2).ok_or(usage)?,
            args.get(3).and_then(|s| s.parse().ok()).unwrap_or(16),
            args.get(4).and_then(|s| s.parse().ok()).unwrap_or(5000),
        ),
        Some("fill") => fill(
            &PathBuf::from(args.get(2).ok_or(usage)?),
            args.get(3).and_then(|s| s.parse().ok()).unwrap_or(100_000),
            args.get(4)
                .and_then(|s| s.parse().ok())
                .unwrap_or(1_000_000),
        ),
        _ => Err(usage.into()),
    }
}
