//! The external-command executor: the contract between dsv and a user's
//! command (`task create --command CMD`).
//!
//! The command runs under `sh -c` in a fresh work folder with:
//!
//! * `DSV_TASK_ID`; `DSV_PARAMS` (a JSON file of the parameters) and one
//!   `DSV_PARAM_SECTION_KEY` per parameter;
//! * `DSV_DATASET_PATH`: a read-only copy of `General/dataset_id` (through
//!   the read-only view of [`crate::view`] where the kernel allows it);
//! * `DSV_METRICS`: a file of JSON lines `{"name", "value", "step"}`;
//! * `DSV_OUTPUT_DIR`: files left there are stored as a version of
//!   `artifacts/<task id>`.
//!
//! Its stdout and stderr become the task's log; its exit code the status.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::time::Duration;

use serde_json::Value;

use dsv::{Finish, Task, TaskStatus};

use crate::exec::{ExecContext, Executor};

/// Runs `command` tasks as external commands (see the module
/// documentation for the contract).
#[derive(Debug, Clone, Copy, Default)]
pub struct CommandExecutor;

impl Executor for CommandExecutor {
    fn run(&self, ctx: &ExecContext<'_>, t: &Task) -> Finish {
        run_command(ctx, t)
    }
}

fn env_key(k: &str) -> String {
    k.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect()
}

fn run_command(ctx: &ExecContext<'_>, t: &Task) -> Finish {
    let (repo, log) = (ctx.repo, ctx.log);
    let fail = |e: String| Finish {
        status: Some(TaskStatus::Failed),
        error: Some(e),
        ..Default::default()
    };
    let work = match tempfile::Builder::new().prefix("dsv-task-").tempdir() {
        Ok(w) => w,
        Err(e) => return fail(format!("cannot make a work folder: {e}")),
    };
    let mut inputs = Vec::new();
    let mut dataset_path = None;
    let mut entry_name = None;
    let mut _pin = None;
    if let Some(ds) = t
        .params
        .get("General/dataset_id")
        .filter(|s| !s.trim().is_empty())
    {
        let v = match repo.resolve(ds.trim()) {
            Ok(v) => v,
            Err(e) => return fail(format!("General/dataset_id: {e}")),
        };
        match repo.get_local(
            &v,
            &dsv::GetLocalOptions {
                pin: true,
                ..Default::default()
            },
        ) {
            Ok(c) => {
                log.line(&format!(
                    "dsv: {} materialized read-only at {}",
                    v.label(),
                    c.path.display()
                ));
                for d in &c.repaired {
                    log.line(&format!(
                        "dsv: the cached copy had been changed ({}: {}); it was rebuilt",
                        d.path, d.detail
                    ));
                }
                dataset_path = Some(c.path.clone());
                entry_name = Some(c.name.clone());
                _pin = c.pin;
            }
            Err(e) => return fail(format!("cannot materialize {}: {e}", v.label())),
        }
        inputs.push(v.id.to_hex());
    }
    let params_file = work.path().join("params.json");
    let metrics_file = work.path().join("metrics.jsonl");
    let out_dir = work.path().join("output");
    if let Err(e) = std::fs::write(
        &params_file,
        serde_json::to_vec_pretty(&t.params).unwrap_or_default(),
    )
    .and_then(|_| std::fs::write(&metrics_file, b""))
    .and_then(|_| std::fs::create_dir(&out_dir))
    {
        return fail(format!("cannot prepare {}: {e}", work.path().display()));
    }
    let make_cmd = || {
        let mut cmd = std::process::Command::new("sh");
        cmd.arg("-c")
            .arg(t.command.clone().unwrap_or_default())
            .env("DSV_TASK_ID", &t.id)
            .env("DSV_PARAMS", &params_file)
            .env("DSV_METRICS", &metrics_file)
            .env("DSV_OUTPUT_DIR", &out_dir)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        if let Some(p) = &dataset_path {
            cmd.env("DSV_DATASET_PATH", p);
        }
        for (k, v) in &t.params {
            cmd.env(format!("DSV_PARAM_{}", env_key(k)), v);
        }
        cmd
    };
    // The dataset is seen through a read-only view of the cache, even by
    // root (crate::view); where the kernel refuses namespaces the command
    // runs without it and the copy is checked afterwards.
    let mut viewed = dataset_path.is_some();
    let spawned = if viewed {
        let mut cmd = make_cmd();
        crate::view::read_only(&mut cmd, repo.cache().dir());
        cmd.spawn().or_else(|e| {
            log.line(&format!(
                "dsv: no read-only view of the dataset ({e}); the task runs on the cached copy \
                 as is, and dsv checks the copy when the task ends"
            ));
            viewed = false;
            make_cmd().spawn()
        })
    } else {
        make_cmd().spawn()
    };
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => return fail(format!("cannot start the command: {e}")),
    };
    let pipes: Vec<std::thread::JoinHandle<()>> = [
        child
            .stdout
            .take()
            .map(|o| Box::new(o) as Box<dyn std::io::Read + Send>),
        child
            .stderr
            .take()
            .map(|o| Box::new(o) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    .map(|r| {
        let log = log.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(r).lines().map_while(Result::ok) {
                log.line(&line);
            }
        })
    })
    .collect();
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Ok(s),
            Ok(None) => {}
            Err(e) => break Err(e),
        }
        if ctx.aborted() {
            let _ = child.kill();
            break child.wait();
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    for p in pipes {
        let _ = p.join();
    }
    if let (false, Some(name)) = (viewed, &entry_name) {
        // Without the read-only view, tell what the command changed (the
        // next `get` rebuilds it).
        match repo.check_local(name) {
            Ok(d) if d.is_empty() => {}
            Ok(d) => {
                for x in d {
                    log.line(&format!(
                        "dsv: the command changed its dataset copy ({}: {}); it is rebuilt before its next use",
                        x.path, x.detail
                    ));
                }
            }
            Err(e) => log.line(&format!("dsv: cannot check the dataset copy: {e}")),
        }
    }
    // Metrics: JSON lines {"name": …, "value": …, "step": …}.
    let mut metrics = BTreeMap::new();
    let mut scalars: BTreeMap<String, Vec<(u64, f64)>> = BTreeMap::new();
    if let Ok(text) = std::fs::read_to_string(&metrics_file) {
        for (i, l) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            match serde_json::from_str::<Value>(l) {
                Ok(v) => match (v["name"].as_str(), v["value"].as_f64()) {
                    (Some(n), Some(x)) => {
                        if let Some(s) = v["step"].as_u64() {
                            scalars.entry(n.to_string()).or_default().push((s, x));
                        }
                        metrics.insert(n.to_string(), x);
                    }
                    _ => log.line(&format!(
                        "dsv: $DSV_METRICS line {}: needs \"name\" and a numeric \"value\"",
                        i + 1
                    )),
                },
                Err(e) => log.line(&format!(
                    "dsv: $DSV_METRICS line {} is not JSON: {e}",
                    i + 1
                )),
            }
        }
    }
    // Artifacts: the output folder, stored as a version of artifacts/<task id>.
    let mut artifacts = None;
    let files: Vec<String> = std::fs::read_dir(&out_dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    if !files.is_empty() {
        match repo.sync("artifacts", &t.id, &out_dir, &Default::default()) {
            Ok(o) => {
                if let Some(v) = o.version {
                    artifacts = Some((v.id.to_hex(), files));
                }
            }
            Err(e) => log.line(&format!("dsv: cannot store the output files: {e}")),
        }
    }
    let (st, error) = match status {
        _ if ctx.aborted() => (TaskStatus::Aborted, None),
        Ok(s) if s.success() => (TaskStatus::Completed, None),
        Ok(s) => (
            TaskStatus::Failed,
            Some(match s.code() {
                Some(c) => format!("the command exited with code {c}"),
                None => "the command was killed by a signal".to_string(),
            }),
        ),
        Err(e) => (
            TaskStatus::Failed,
            Some(format!("waiting for the command: {e}")),
        ),
    };
    Finish {
        status: Some(st),
        error,
        metrics,
        scalars,
        inputs,
        artifacts,
        ..Default::default()
    }
}
