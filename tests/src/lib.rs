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

/// A free TCP port on the loopback interface.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// Waits until something accepts connections on `port` (at most `limit`).
pub fn wait_for_port(port: u16, limit: std::time::Duration) -> bool {
    let start = std::time::Instant::now();
    while start.elapsed() < limit {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    false
}

/// A real S3-compatible server for the tests: moto's standalone server
/// (`pip install 'moto[server]'`, installed by `.ci/run`), started on a free
/// loopback port and stopped when dropped. `$DSV_MOTO_SERVER` names the
/// program when it is not `moto_server` on the PATH.
pub struct S3Server {
    child: std::process::Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
}

impl S3Server {
    /// Starts the server.
    pub fn start() -> Self {
        let prog = std::env::var("DSV_MOTO_SERVER").unwrap_or_else(|_| "moto_server".into());
        let port = free_port();
        let child = Command::new(&prog)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start {prog} ({e}): install it with pip install 'moto[server]' (.ci/run does)")
            });
        let mut s = Self { child, port };
        assert!(
            wait_for_port(port, std::time::Duration::from_secs(60)),
            "{prog} did not listen on 127.0.0.1:{port}"
        );
        // Reachable is not ready: wait for an answer to a request.
        let start = std::time::Instant::now();
        while s.request("GET", "/", b"").is_none() {
            assert!(start.elapsed().as_secs() < 60, "{prog} does not answer");
            std::thread::sleep(std::time::Duration::from_millis(50));
            if let Ok(Some(st)) = s.child.try_wait() {
                panic!("{prog} exited: {st}");
            }
        }
        s
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// One plain HTTP request (with a placeholder signature: moto checks
    /// none unless told to); the status code and body.
    pub fn request(&self, method: &str, path: &str, body: &[u8]) -> Option<(u16, Vec<u8>)> {
        use std::io::{Read, Write};
        let mut c = std::net::TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: {}\r\nConnection: close\r\n\
             Authorization: AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/s3/aws4_request, \
             SignedHeaders=host, Signature=0\r\n\r\n",
            self.port,
            body.len()
        );
        c.write_all(head.as_bytes()).ok()?;
        c.write_all(body).ok()?;
        let mut out = Vec::new();
        c.read_to_end(&mut out).ok()?;
        let text = String::from_utf8_lossy(&out);
        let code = text.split_whitespace().nth(1)?.parse().ok()?;
        let body_at = out.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
        Some((code, out[body_at..].to_vec()))
    }

    /// From now on the server checks every request's signature against
    /// the IAM users it knows (none: every key is refused, as a wrong
    /// key would be by AWS).
    pub fn enforce_auth(&self) {
        let r = self.request("POST", "/moto-api/reset-auth", b"0");
        assert!(matches!(r, Some((200, _))), "cannot enforce auth: {r:?}");
    }

    /// The object names under `prefix` in `bucket`, sorted.
    pub fn keys(&self, bucket: &str, prefix: &str) -> Vec<String> {
        let (code, body) = self
            .request(
                "GET",
                &format!("/{bucket}?list-type=2&prefix={prefix}"),
                b"",
            )
            .expect("the object store answers a listing");
        assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
        let text = String::from_utf8_lossy(&body);
        let mut keys: Vec<String> = text
            .split("<Key>")
            .skip(1)
            .filter_map(|s| s.split("</Key>").next())
            .map(String::from)
            .collect();
        keys.sort();
        keys
    }

    /// Creates a bucket.
    pub fn bucket(&self, name: &str) {
        let r = self.request("PUT", &format!("/{name}"), b"");
        assert!(
            matches!(r, Some((200, _))),
            "cannot create bucket {name}: {r:?}"
        );
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP proxy on a free loopback port in front of `target_port` that
/// breaks every `every`-th connection after relaying `after` bytes of the
/// server's answer (a connection dropped mid-transfer). Counts the drops.
pub struct FaultProxy {
    /// Its port.
    pub port: u16,
    /// Connections broken so far.
    pub dropped: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// While set, new connections are accepted and never answered (a
    /// network partition as the client sees it: requests hang).
    pub hold: std::sync::Arc<std::sync::atomic::AtomicBool>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl FaultProxy {
    /// Starts the proxy.
    pub fn start(target_port: u16, every: usize, after: usize) -> Self {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        use std::sync::Arc;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        listener.set_nonblocking(true).expect("nonblocking");
        let dropped = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let hold = Arc::new(AtomicBool::new(false));
        let (d, st, h) = (dropped.clone(), stop.clone(), hold.clone());
        std::thread::spawn(move || {
            let mut n = 0usize;
            while !st.load(Ordering::SeqCst) {
                let (client, _) = match listener.accept() {
                    Ok(c) => c,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(std::time::Duration::from_millis(5));
                        continue;
                    }
                    Err(_) => break,
                };
                let _ = client.set_nonblocking(false);
                if h.load(Ordering::SeqCst) {
                    let st = st.clone();
                    std::thread::spawn(move || {
                        // Holds the connection open, unanswered, until the
                        // proxy is dropped.
                        while !st.load(Ordering::SeqCst) {
                            std::thread::park_timeout(std::time::Duration::from_millis(100));
                        }
                        drop(client);
                    });
                    continue;
                }
                n += 1;
                let faulty = every > 0 && n % every == 0;
                let (d, h, st) = (d.clone(), h.clone(), st.clone());
                std::thread::spawn(move || {
                    relay(client, target_port, faulty.then_some(after), &d, h, st)
                });
            }
        });
        Self {
            port,
            dropped,
            hold,
            stop,
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

fn relay(
    client: std::net::TcpStream,
    target: u16,
    cut_after: Option<usize>,
    dropped: &std::sync::atomic::AtomicUsize,
    hold: std::sync::Arc<std::sync::atomic::AtomicBool>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    use std::io::{Read, Write};
    let Ok(server) = std::net::TcpStream::connect(("127.0.0.1", target)) else {
        return;
    };
    let (mut c_in, mut s_out) = (
        client.try_clone().expect("clone"),
        server.try_clone().expect("clone"),
    );
    let up = std::thread::spawn(move || {
        let mut buf = [0u8; 64 << 10];
        while let Ok(n) = c_in.read(&mut buf) {
            // Held: a request on a kept-alive connection hangs too.
            while hold.load(std::sync::atomic::Ordering::SeqCst)
                && !stop.load(std::sync::atomic::Ordering::SeqCst)
            {
                std::thread::park_timeout(std::time::Duration::from_millis(100));
            }
            if n == 0 || s_out.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = s_out.shutdown(std::net::Shutdown::Write);
    });
    let (mut s_in, mut c_out) = (server, client);
    let mut sent = 0usize;
    let mut buf = [0u8; 16 << 10];
    loop {
        let n = match s_in.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some(limit) = cut_after {
            if sent + n > limit {
                let _ = c_out.write_all(&buf[..limit.saturating_sub(sent)]);
                dropped.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let _ = c_out.shutdown(std::net::Shutdown::Both);
                let _ = s_in.shutdown(std::net::Shutdown::Both);
                break;
            }
        }
        if c_out.write_all(&buf[..n]).is_err() {
            break;
        }
        sent += n;
    }
    let _ = c_out.shutdown(std::net::Shutdown::Both);
    let _ = up.join();
}

/// Whether `path` is a mount point (from /proc/mounts).
pub fn mounted(path: &Path) -> bool {
    let canon = path.canonicalize().unwrap_or(path.to_path_buf());
    std::fs::read_to_string("/proc/mounts")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(1) == Some(canon.to_str().unwrap()))
}

/// Starts `dsv dataset mount` (with `s`'s environment); returns once the mount is serving.
pub fn start_mount(s: &Sandbox, rev: &str, at: &Path) -> std::process::Child {
    std::fs::create_dir_all(at).unwrap();
    let mut child = s
        .cmd(&["--json", "dataset", "mount", rev, at.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The JSON document is printed once the file system is mounted.
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut text = String::new();
    loop {
        let mut line = String::new();
        let n = std::io::BufRead::read_line(&mut out, &mut line).unwrap();
        if n == 0 {
            let o = child.wait_with_output().unwrap();
            panic!("mount exited early: {}", stderr(&o));
        }
        text.push_str(&line);
        if line.starts_with('}') {
            break;
        }
    }
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["pid"], child.id());
    assert!(mounted(at), "{} is not mounted", at.display());
    child
}

/// Stops a mount started by [`start_mount`] (SIGTERM) and checks that it
/// exited cleanly and unmounted.
pub fn stop_mount(child: std::process::Child, at: &Path) {
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "mount exited with {:?}: {}",
        out.status,
        stderr(&out)
    );
    assert!(
        !mounted(at),
        "{} is still mounted after SIGTERM",
        at.display()
    );
}

/// `len` bytes of incompressible data from `seed` (xorshift): distinct per
/// seed, the same on every run.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Every file under `dir` (recursively) with its bytes, by path relative
/// to `dir`, sorted.
pub fn files_under(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("list {}: {e}", d.display())) {
            let p = e.expect("entry").path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p
                    .strip_prefix(dir)
                    .expect("below dir")
                    .to_string_lossy()
                    .into_owned();
                let bytes =
                    std::fs::read(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
                out.push((rel, bytes));
            }
        }
    }
    out.sort();
    out
}

/// Flips one byte in the middle of a file (a pack: inside some record);
/// returns the file's bytes from before.
pub fn flip_middle_byte(path: &Path) -> Vec<u8> {
    let before = std::fs::read(path).unwrap();
    let mut bytes = before.clone();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xFF;
    std::fs::write(path, &bytes).unwrap();
    before
}

/// A throwaway PostgreSQL cluster for the tests: `initdb` and `pg_ctl` run
/// as an unprivileged user (nobody, through `setpriv`, when this process is
/// root: PostgreSQL refuses to run as root) on a free loopback port; the
/// cluster is stopped and removed when dropped. Local connections need no
/// password; TCP connections authenticate with SCRAM as user `dsv` with
/// [`PgCluster::PASSWORD`] (so that the tests see real password handling).
/// The binaries come from `pg_config --bindir` (Debian's `postgresql` and
/// `libpq-dev`, installed by `.ci/run`).
pub struct PgCluster {
    root: tempfile::TempDir,
    bin: PathBuf,
    /// Its port on 127.0.0.1.
    pub port: u16,
}

impl PgCluster {
    /// The password of user `dsv`.
    pub const PASSWORD: &'static str = "dsv-test-secret";

    fn bin() -> PathBuf {
        match Command::new("pg_config").arg("--bindir").output() {
            Ok(o) if o.status.success() => {
                PathBuf::from(String::from_utf8_lossy(&o.stdout).trim().to_string())
            }
            _ => PathBuf::from("/usr/lib/postgresql/15/bin"),
        }
    }

    fn as_server_user(&self, prog: &str) -> Command {
        let mut c = if is_root() {
            let mut c = Command::new("setpriv");
            c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
                .arg(self.bin.join(prog));
            c
        } else {
            Command::new(self.bin.join(prog))
        };
        c.env_remove("PGDATA")
            .env_remove("PGPASSWORD")
            .env("HOME", self.root.path())
            .stdout(std::process::Stdio::null());
        c
    }

    fn data(&self) -> PathBuf {
        self.root.path().join("data")
    }

    fn sock(&self) -> PathBuf {
        self.root.path().join("s")
    }

    /// Creates and starts a cluster.
    pub fn start() -> Self {
        use std::os::unix::fs::PermissionsExt;
        // Short: the socket path must fit in 107 bytes.
        let root = tempfile::Builder::new()
            .prefix("dsvpg")
            .tempdir_in("/tmp")
            .expect("a temporary folder");
        std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        let mut c = PgCluster {
            root,
            bin: Self::bin(),
            port: 0,
        };
        let (data, sock) = (c.data(), c.sock());
        std::fs::create_dir(&data).expect("mkdir data");
        std::fs::create_dir(&sock).expect("mkdir socket folder");
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        let pwfile = c.root.path().join("pw");
        std::fs::write(&pwfile, Self::PASSWORD).expect("write the password file");
        std::fs::set_permissions(&pwfile, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        if is_root() {
            for d in [&data, &sock] {
                let ok = Command::new("chown")
                    .arg("65534:65534")
                    .arg(d)
                    .status()
                    .expect("chown runs")
                    .success();
                assert!(ok, "chown {}", d.display());
            }
        }
        let ok = c
            .as_server_user("initdb")
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "dsv",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
            ])
            .arg(format!("--pwfile={}", pwfile.display()))
            .args(["--encoding=UTF8", "--locale=C.UTF-8", "--no-sync"])
            .status()
            .expect("initdb runs (PostgreSQL is installed by .ci/run)")
            .success();
        assert!(ok, "initdb failed");
        for _ in 0..5 {
            c.port = free_port();
            if c.pg_ctl_start() {
                return c;
            }
        }
        panic!("PostgreSQL did not start: {}", c.log());
    }

    fn pg_ctl_start(&self) -> bool {
        self.as_server_user("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .arg("-l")
            .arg(self.sock().join("log"))
            .args(["-w", "-t", "60", "-o"])
            .arg(format!(
                "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off \
                 -c synchronous_commit=off -c full_page_writes=off -c max_connections=300 \
                 -c max_pred_locks_per_transaction=256",
                self.port,
                self.sock().display()
            ))
            .arg("start")
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }

    /// The server's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.sock().join("log")).unwrap_or_default()
    }

    /// A URL for database `db` without the password (it comes from
    /// `PGPASSWORD` or a `.pgpass` file, as a user would keep it).
    pub fn url(&self, db: &str) -> String {
        format!("postgres://dsv@127.0.0.1:{}/{db}", self.port)
    }

    /// A URL for database `db` with the password in it.
    pub fn url_with_password(&self, db: &str) -> String {
        format!(
            "postgres://dsv:{}@127.0.0.1:{}/{db}",
            Self::PASSWORD,
            self.port
        )
    }

    /// Runs SQL as the superuser over the local socket.
    pub fn psql(&self, db: &str, sql: &str) -> Output {
        let mut c = self.as_server_user("psql");
        c.arg("-h")
            .arg(self.sock())
            .args(["-p", &self.port.to_string(), "-U", "dsv", "-d", db])
            .args(["-v", "ON_ERROR_STOP=1", "-At", "-c", sql])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        c.output().expect("psql runs")
    }

    /// Creates database `db`.
    pub fn create_db(&self, db: &str) {
        let o = self.psql("postgres", &format!("CREATE DATABASE \"{db}\""));
        assert!(o.status.success(), "create database {db}: {}", stderr(&o));
    }

    fn pg_ctl_stop(&self, mode: &str) {
        let _ = self
            .as_server_user("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-m", mode, "-w", "stop"])
            .status();
    }

    /// Stops the server (fast shutdown: sessions are ended).
    pub fn stop(&self) {
        self.pg_ctl_stop("fast");
    }

    /// Starts the stopped server again on the same port.
    pub fn restart(&self) {
        assert!(
            self.pg_ctl_start(),
            "PostgreSQL did not restart: {}",
            self.log()
        );
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        self.pg_ctl_stop("immediate");
    }
}
