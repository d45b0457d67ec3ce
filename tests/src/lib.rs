//! Helpers for the end-to-end tests: find the `dsv` binary, make scratch
//! repositories, run commands and parse their JSON.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The `dsv` binary built by this workspace.
pub fn dsv_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("DSV_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("the test binary knows its path");
    // target/<profile>/deps/<test> → target/<profile>/dsv
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binaries live in target/<profile>/deps");
    let bin = profile_dir.join("dsv");
    assert!(
        bin.is_file(),
        "{} is missing: run scripts/test (it builds the dsv binary, then runs the tests)",
        bin.display()
    );
    bin
}

/// The shared occupancy data set (read-only, outside the project):
/// `$DSV_OCCUPANCY` when set (as for `scripts/demo`), else
/// `../shared/data/occupancy` beside the checkout.
pub fn occupancy_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("DSV_OCCUPANCY") {
        let p = PathBuf::from(p);
        assert!(
            p.join("datatraining.txt").is_file(),
            "DSV_OCCUPANCY={} holds no datatraining.txt",
            p.display()
        );
        return p;
    }
    // Looked up at run time from the working directory (cargo runs tests
    // in the package folder): the build may have been made in another
    // checkout sharing the target folder.
    let cwd = std::env::current_dir().expect("a working directory");
    let baked = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    for start in [cwd.as_path(), baked.as_path()] {
        for anc in start.ancestors() {
            let c = anc.join("shared/data/occupancy");
            if c.join("datatraining.txt").is_file() {
                return c;
            }
        }
    }
    panic!(
        "the occupancy data is missing: expected ../shared/data/occupancy beside the checkout, or set DSV_OCCUPANCY"
    );
}

/// A scratch folder with a repository in it.
pub struct Sandbox {
    /// Holds the temporary folder alive.
    pub dir: tempfile::TempDir,
}

impl Default for Sandbox {
    fn default() -> Self {
        Self::new()
    }
}

impl Sandbox {
    /// A sandbox with `dsv init` already run in `repo/`.
    pub fn new() -> Self {
        let s = Self::empty();
        let out = s.dsv(&["init", s.repo().to_str().expect("utf-8 temp path")]);
        assert!(
            out.status.success(),
            "init failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        s
    }

    /// A sandbox without a repository.
    pub fn empty() -> Self {
        Self {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    /// The repository's work folder (holding `.dsv`).
    pub fn repo(&self) -> PathBuf {
        self.dir.path().join("repo")
    }

    /// A path inside the sandbox.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Runs `dsv ARGS` against this repository.
    pub fn dsv(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("dsv runs")
    }

    /// The command, for callers that need to adjust it.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(dsv_bin());
        c.args(args)
            .env("DSV_REPO", self.repo())
            .env_remove("RUST_LOG")
            .current_dir(self.dir.path());
        c
    }

    /// Runs `dsv --json ARGS`, asserts success, parses stdout.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = self.dsv(&all);
        assert!(
            out.status.success(),
            "dsv {args:?} failed ({:?}): {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "dsv {args:?} printed no JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }
}

/// stderr as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// stdout as text.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Copies the files of `from` (not recursive) into `to`.
pub fn copy_files(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create target");
    for e in std::fs::read_dir(from).expect("list source") {
        let p = e.expect("entry").path();
        if p.is_file() {
            std::fs::copy(&p, to.join(p.file_name().expect("name"))).expect("copy");
        }
    }
}

/// Whether this process runs as root (then permission tests drop privileges).
pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false)
}

/// Runs `dsv ARGS` on `repo` as an ordinary user: as nobody (through
/// `setpriv`) when this process is root, who reads every file whatever its
/// permissions.
pub fn dsv_unprivileged(repo: &Path, args: &[&str]) -> Output {
    let mut c = if is_root() {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(dsv_bin());
        c
    } else {
        Command::new(dsv_bin())
    };
    c.args(args)
        .env("DSV_REPO", repo)
        .env_remove("RUST_LOG")
        .output()
        .expect("dsv runs")
}

/// Opens everything under `dir` to every user (for [`dsv_unprivileged`]),
/// then makes `file` unreadable.
pub fn make_unreadable(dir: &Path, file: &Path) {
    for (mode, path) in [("a+rwX", dir), ("000", file)] {
        let mut c = Command::new("chmod");
        if mode != "000" {
            c.arg("-R");
        }
        let ok = c
            .arg(mode)
            .arg(path)
            .status()
            .expect("chmod runs")
            .success();
        assert!(ok, "chmod {mode} {}", path.display());
    }
}

/// Runs `program ARGS` as an ordinary user (nobody, through `setpriv`,
/// when this process is root; as is otherwise).
pub fn run_unprivileged(program: &str, args: &[&str]) -> Output {
    let mut c = if is_root() {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", program]);
        c
    } else {
        Command::new(program)
    };
    c.args(args).output().expect("command runs")
}

/// Opens everything under `dir` to every user (for the unprivileged runs).
pub fn open_to_everyone(dir: &Path) {
    let ok = Command::new("chmod")
        .args(["-R", "a+rwX"])
        .arg(dir)
        .status()
        .expect("chmod runs")
        .success();
    assert!(ok, "chmod -R a+rwX {}", dir.display());
}
