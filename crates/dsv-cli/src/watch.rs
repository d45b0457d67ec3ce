//! `dsv dataset watch`: add each file once it is finished (unchanged for
//! `--settle` seconds) into one draft; finalize on SIGINT/SIGTERM. Files
//! are noticed through the OS's file-change notifications (inotify), not by
//! polling; each file is staged in its own atomic write, so a `kill -9`
//! loses nothing staged, and the next `watch` of the same folder resumes
//! the same draft.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use clap::Args;
use notify::{RecursiveMode, Watcher};
use serde_json::json;

use dsv::{AddOptions, CreateOptions, DraftHandle, Repo};

use crate::error::CliError;
use crate::output;
use crate::Ctx;

/// `watch`.
#[derive(Debug, Args)]
pub struct WatchArgs {
    /// PROJECT/NAME.
    dataset: String,
    /// Folder to watch.
    folder: PathBuf,
    /// Seconds a file must stay unchanged before it is added.
    #[arg(long, default_value_t = 2.0)]
    settle: f64,
    /// Folder inside the dataset the watched folder maps to.
    #[arg(long, default_value = "")]
    dataset_path: String,
}

enum Msg {
    Paths(Vec<PathBuf>),
    Stop(i32),
    WatchError(String),
}

#[derive(Clone, Copy, PartialEq, Eq)]
struct Fingerprint {
    size: u64,
    mtime: Option<SystemTime>,
}

fn fingerprint(p: &Path) -> Option<Fingerprint> {
    let m = std::fs::symlink_metadata(p).ok()?;
    if !m.is_file() {
        return None;
    }
    Some(Fingerprint {
        size: m.len(),
        mtime: m.modified().ok(),
    })
}

fn walk(dir: &Path, skip: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p == skip {
            continue;
        }
        match e.file_type() {
            Ok(t) if t.is_dir() => walk(&p, skip, out),
            Ok(t) if t.is_file() => out.push(p),
            _ => {}
        }
    }
}

/// Records a change notification: the settle clock restarts only when the
/// file's size or mtime really changed (or it is new to us).
fn note(pending: &mut HashMap<PathBuf, (Option<Fingerprint>, Instant)>, p: PathBuf, t: Instant) {
    let fp = fingerprint(&p);
    match pending.get_mut(&p) {
        Some((old, since)) => {
            if *old != fp {
                *old = fp;
                *since = t;
            }
        }
        None => {
            pending.insert(p, (fp, t));
        }
    }
}

fn find_or_create_draft(
    repo: &Repo,
    project: &str,
    name: &str,
    folder: &str,
) -> Result<(DraftHandle, bool), CliError> {
    if let Some(ds) = repo.dataset(project, name)? {
        for d in repo.drafts(Some(&ds))? {
            if d.info.watch.as_deref() == Some(folder) {
                return Ok((d, true));
            }
        }
    }
    // Created and marked in one write: a crash cannot leave an unmarked
    // draft that a restarted watch would not resume.
    let opts = CreateOptions {
        watch: Some(folder.to_string()),
        ..Default::default()
    };
    let d = repo.writable_copy_or_create(project, name, &opts)?;
    Ok((d, false))
}

/// Runs the watch until SIGINT or SIGTERM.
pub fn watch(ctx: &Ctx, a: WatchArgs) -> Result<(), CliError> {
    let repo = crate::dataset::open(ctx)?;
    let (project, name) = dsv::rev::parse_dataset_name(&a.dataset)?;
    if !(a.settle.is_finite() && a.settle >= 0.0) {
        return Err(CliError::user(format!(
            "--settle {}: must be a number of seconds ≥ 0",
            a.settle
        )));
    }
    let folder = std::fs::canonicalize(&a.folder)
        .map_err(|e| CliError::user(format!("cannot watch {}: {e}", a.folder.display())))?;
    if !folder.is_dir() {
        return Err(CliError::user(format!(
            "{} is not a folder",
            folder.display()
        )));
    }
    let repo_dir = std::fs::canonicalize(repo.store().dir()).unwrap_or_default();
    let folder_key = folder.display().to_string();
    let (draft, resumed) = find_or_create_draft(&repo, &project, &name, &folder_key)?;
    let settle = Duration::from_secs_f64(a.settle);

    let (tx, rx) = mpsc::channel::<Msg>();
    let txw = tx.clone();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        let _ = match res {
            // Reads (ours included) are not changes.
            Ok(ev) if matches!(ev.kind, notify::EventKind::Access(_)) => Ok(()),
            Ok(ev) => txw.send(Msg::Paths(ev.paths)),
            Err(e) => txw.send(Msg::WatchError(e.to_string())),
        };
    })
    .map_err(|e| CliError::repo(format!("cannot watch {}: {e}", folder.display())))?;
    watcher
        .watch(&folder, RecursiveMode::Recursive)
        .map_err(|e| CliError::repo(format!("cannot watch {}: {e}", folder.display())))?;
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])
    .map_err(|e| CliError::repo(format!("cannot handle signals: {e}")))?;
    let txs = tx.clone();
    std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            let _ = txs.send(Msg::Stop(sig));
        }
    });

    if !ctx.json {
        eprintln!(
            "{} draft {} of {}/{}; watching {} (settle {:.1}s); Ctrl-C finalizes",
            if resumed { "resuming" } else { "started" },
            draft.id.short(12),
            project,
            name,
            folder.display(),
            a.settle
        );
    }

    // Files seen, with their last fingerprint and when it last changed.
    let mut pending: HashMap<PathBuf, (Option<Fingerprint>, Instant)> = HashMap::new();
    let mut existing = Vec::new();
    walk(&folder, &repo_dir, &mut existing);
    let start = Instant::now();
    for p in existing {
        pending.insert(p.clone(), (fingerprint(&p), start));
    }
    let mut added_total = 0usize;
    let stop_signal;
    loop {
        let now = Instant::now();
        let wait = pending
            .values()
            .map(|(_, t)| (*t + settle).saturating_duration_since(now))
            .min();
        let msg = match wait {
            Some(w) => match rx.recv_timeout(w) {
                Ok(m) => Some(m),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => Some(Msg::Stop(0)),
            },
            None => Some(rx.recv().unwrap_or(Msg::Stop(0))),
        };
        match msg {
            Some(Msg::Stop(sig)) => {
                stop_signal = sig;
                break;
            }
            Some(Msg::WatchError(e)) => eprintln!("warning: file watching: {e}"),
            Some(Msg::Paths(paths)) => {
                let t = Instant::now();
                for p in paths {
                    if p.starts_with(&repo_dir) {
                        continue;
                    }
                    if p.is_dir() {
                        let mut files = Vec::new();
                        walk(&p, &repo_dir, &mut files);
                        for f in files {
                            note(&mut pending, f, t);
                        }
                    } else {
                        note(&mut pending, p, t);
                    }
                }
            }
            None => {}
        }
        // Stage files that stayed unchanged for `settle`.
        let now = Instant::now();
        let mut ready = Vec::new();
        for (p, (fp, since)) in pending.iter_mut() {
            if now.duration_since(*since) < settle {
                continue;
            }
            let cur = fingerprint(p);
            if cur != *fp {
                *fp = cur;
                *since = now;
                continue;
            }
            ready.push(p.clone());
        }
        for p in ready {
            let (fp, _) = pending.remove(&p).unwrap_or((None, now));
            if fp.is_none() {
                continue; // gone, or not a regular file
            }
            let rel_dir = p
                .parent()
                .and_then(|d| d.strip_prefix(&folder).ok())
                .map(|d| d.to_string_lossy().into_owned())
                .unwrap_or_default();
            let dataset_path = [a.dataset_path.trim_matches('/'), rel_dir.as_str()]
                .iter()
                .filter(|s| !s.is_empty())
                .cloned()
                .collect::<Vec<_>>()
                .join("/");
            match repo.add(
                &draft,
                std::slice::from_ref(&p),
                &AddOptions {
                    dataset_path,
                    ..Default::default()
                },
            ) {
                Ok(r) => {
                    let n = r.added.len() + r.modified.len();
                    added_total += n;
                    if n > 0 && !ctx.json {
                        for x in r.added.iter().chain(&r.modified) {
                            eprintln!("  staged {x}");
                        }
                    }
                }
                Err(e) => {
                    let e: CliError = e.into();
                    if e.code == 2 {
                        return Err(e);
                    }
                    eprintln!("warning: {} not added: {}", p.display(), e.message);
                }
            }
        }
    }
    drop(watcher);
    if !pending.is_empty() && !ctx.json {
        eprintln!(
            "{} file(s) still changing were not added: {}",
            pending.len(),
            pending
                .keys()
                .take(5)
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    // Finalize: only when the draft differs from where it started.
    let current = repo.draft(&draft.id)?;
    let changed = match current.parents.first() {
        Some(p) => {
            let root = repo.store().draft(&draft.id)?.record.root;
            let proot = repo.store().version(p)?.object.root;
            !repo.store().diff(&proot, &root)?.is_empty()
        }
        None => current.file_count > 0,
    };
    if !changed {
        repo.discard(&current)?;
        if ctx.json {
            return output::json(&json!({"changed": false, "signal": stop_signal}));
        }
        eprintln!("nothing new; no version created");
        return Ok(());
    }
    let v = repo.finalize(&current)?;
    if ctx.json {
        let mut doc = crate::dataset::version_json(&v);
        doc["changed"] = json!(true);
        doc["staged_this_run"] = json!(added_total);
        return output::json(&doc);
    }
    let d = &v.delta;
    println!(
        "{}/{} {} {}: +{} ~{} -{} ({} files)",
        project,
        name,
        v.version,
        v.id.short(12),
        d.added,
        d.modified,
        d.removed,
        v.file_count
    );
    Ok(())
}
