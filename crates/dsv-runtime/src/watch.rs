//! `dataset watch`: each file of a folder, once it is finished (unchanged
//! for a settle time), is added into one draft; the draft is finalized when
//! the watch is stopped. Files are noticed through the OS's file-change
//! notifications (inotify), not by polling; each file is staged in its own
//! atomic write, so a `kill -9` loses nothing staged, and the next watch of
//! the same folder resumes the same draft.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use notify::{RecursiveMode, Watcher as _};

use dsv::{AddOptions, CreateOptions, DatasetVersion, DraftHandle, Repo};

use crate::error::{Error, Result};

/// What to watch.
#[derive(Debug, Clone)]
pub struct WatchOptions {
    /// Dataset project.
    pub project: String,
    /// Dataset name.
    pub name: String,
    /// The folder watched.
    pub folder: PathBuf,
    /// How long a file must stay unchanged before it is added.
    pub settle: Duration,
    /// Folder inside the dataset the watched folder maps to.
    pub dataset_path: String,
}

/// What a watch reports.
pub trait WatchEvents {
    /// A file was staged (`path` inside the dataset).
    fn staged(&self, _path: &str) {}
    /// The notifier reported an error; the watch goes on.
    fn watch_error(&self, _message: &str) {}
    /// A file could not be added (bad input); the watch goes on.
    fn not_added(&self, _file: &Path, _error: &dsv::Error) {}
    /// When stopping: files still changing, not added.
    fn unsettled(&self, _files: &[PathBuf]) {}
}

/// Reports nothing.
impl WatchEvents for () {}

/// How a watch ended.
#[derive(Debug)]
pub struct WatchOutcome {
    /// The code given to [`WatchStop::stop`] (the CLI passes the signal).
    pub signal: i32,
    /// Files staged by this run.
    pub staged: usize,
    /// The version finalized, or `None` when the draft did not differ from
    /// where it started (it was discarded).
    pub version: Option<DatasetVersion>,
}

enum Msg {
    Paths(Vec<PathBuf>),
    Stop(i32),
    WatchError(String),
}

/// Stops a running [`Watcher`] from another thread (a signal handler's).
#[derive(Clone)]
pub struct WatchStop(mpsc::Sender<Msg>);

impl WatchStop {
    /// Ends the watch: what settled is staged, the draft finalized.
    /// `code` is reported back in [`WatchOutcome::signal`].
    pub fn stop(&self, code: i32) {
        let _ = self.0.send(Msg::Stop(code));
    }
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
) -> Result<(DraftHandle, bool)> {
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

/// A watch of one folder into one draft. Created, it already receives the
/// folder's change notifications; [`Watcher::run`] stages and finalizes.
pub struct Watcher<'r> {
    repo: &'r Repo,
    options: WatchOptions,
    folder: PathBuf,
    repo_dir: PathBuf,
    draft: DraftHandle,
    resumed: bool,
    tx: mpsc::Sender<Msg>,
    rx: mpsc::Receiver<Msg>,
    notifier: notify::RecommendedWatcher,
}

impl<'r> Watcher<'r> {
    /// Starts watching: resumes the draft of an earlier watch of the same
    /// folder (or creates one marked with it) and subscribes to the
    /// folder's changes.
    pub fn new(repo: &'r Repo, options: WatchOptions) -> Result<Watcher<'r>> {
        let folder = std::fs::canonicalize(&options.folder).map_err(|e| Error::Folder {
            path: options.folder.clone(),
            source: e,
        })?;
        if !folder.is_dir() {
            return Err(Error::NotAFolder { path: folder });
        }
        let repo_dir = std::fs::canonicalize(repo.store().dir()).unwrap_or_default();
        let folder_key = folder.display().to_string();
        let (draft, resumed) =
            find_or_create_draft(repo, &options.project, &options.name, &folder_key)?;
        let (tx, rx) = mpsc::channel::<Msg>();
        let txw = tx.clone();
        let watch_err = |e: notify::Error| Error::Watch {
            path: folder.clone(),
            message: e.to_string(),
        };
        let mut notifier =
            notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
                let _ = match res {
                    // Reads (ours included) are not changes.
                    Ok(ev) if matches!(ev.kind, notify::EventKind::Access(_)) => Ok(()),
                    Ok(ev) => txw.send(Msg::Paths(ev.paths)),
                    Err(e) => txw.send(Msg::WatchError(e.to_string())),
                };
            })
            .map_err(watch_err)?;
        notifier
            .watch(&folder, RecursiveMode::Recursive)
            .map_err(watch_err)?;
        Ok(Watcher {
            repo,
            options,
            folder,
            repo_dir,
            draft,
            resumed,
            tx,
            rx,
            notifier,
        })
    }

    /// The draft files are staged into.
    pub fn draft(&self) -> &DraftHandle {
        &self.draft
    }
    /// Whether the draft was an earlier watch's (resumed) or new.
    pub fn resumed(&self) -> bool {
        self.resumed
    }
    /// The folder watched, resolved.
    pub fn folder(&self) -> &Path {
        &self.folder
    }
    /// A handle that stops [`Watcher::run`].
    pub fn stopper(&self) -> WatchStop {
        WatchStop(self.tx.clone())
    }

    /// Stages each file once it settled, until stopped through a
    /// [`WatchStop`]; then finalizes the draft when it differs from where
    /// it started (or discards it). A file that cannot be added is
    /// reported and skipped; a repository problem ends the watch with the
    /// error (what was staged stays in the draft for the next watch).
    pub fn run(self, events: &dyn WatchEvents) -> Result<WatchOutcome> {
        let Watcher {
            repo,
            options,
            folder,
            repo_dir,
            draft,
            tx,
            rx,
            notifier,
            ..
        } = self;
        // Only the watcher's own senders remain besides stoppers: a watch
        // nobody can stop ends when they are all gone.
        drop(tx);
        let settle = options.settle;
        // Files seen, with their last fingerprint and when it last changed.
        let mut pending: HashMap<PathBuf, (Option<Fingerprint>, Instant)> = HashMap::new();
        let mut existing = Vec::new();
        walk(&folder, &repo_dir, &mut existing);
        let start = Instant::now();
        for p in existing {
            pending.insert(p.clone(), (fingerprint(&p), start));
        }
        let mut staged = 0usize;
        let signal;
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
                    signal = sig;
                    break;
                }
                Some(Msg::WatchError(e)) => events.watch_error(&e),
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
                let dataset_path = [options.dataset_path.trim_matches('/'), rel_dir.as_str()]
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
                        staged += r.added.len() + r.modified.len();
                        for x in r.added.iter().chain(&r.modified) {
                            events.staged(x);
                        }
                    }
                    Err(e) if e.is_repository_problem() => return Err(e.into()),
                    Err(e) => events.not_added(&p, &e),
                }
            }
        }
        drop(notifier);
        if !pending.is_empty() {
            events.unsettled(&pending.keys().cloned().collect::<Vec<_>>());
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
            return Ok(WatchOutcome {
                signal,
                staged,
                version: None,
            });
        }
        let version = Some(repo.finalize(&current)?);
        Ok(WatchOutcome {
            signal,
            staged,
            version,
        })
    }
}
