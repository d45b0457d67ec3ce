//! Team repositories end to end: PostgreSQL (a throwaway cluster run as an
//! unprivileged user) for the metadata, a real S3-compatible server (moto)
//! for the packs, and three "machines" — separate processes with separate
//! homes, repository folders, caches and credentials:
//!
//! 1. the labeling machine creates the team repository and syncs versions;
//! 2. machine 2 runs `dsv agent --triggers` (it fires the triggers and
//!    reaps dead tasks, requeueing them) and later an agent on `train`;
//! 3. machine 3 runs the training agent, in its own UTS namespace (another
//!    host name, so only its lease tells whether it lives) and reaching the
//!    object store through a proxy that can cut it off.
//!
//! The retraining loop (trigger → clone → train → promote) runs across
//! them; machine 3 is killed with SIGKILL mid-task (its reads hang behind
//! the proxy) and the task completes on machine 2. Every version and every
//! firing happens exactly once, and `fsck --read-data` is clean on every
//! machine.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use dsv_tests::{dsv_bin, is_root, occupancy_dir, stderr, FaultProxy, PgCluster, S3Server};
use serde_json::Value;

/// One machine: its own home (credentials), working folder and `.dsv`.
struct Machine {
    root: PathBuf,
    env: Vec<(String, String)>,
}

impl Machine {
    fn new(base: &Path, name: &str, env: &[(&str, &str)]) -> Self {
        let root = base.join(name);
        std::fs::create_dir_all(root.join("home")).unwrap();
        let mut all: Vec<(String, String)> = vec![
            ("HOME".into(), root.join("home").display().to_string()),
            ("AWS_ACCESS_KEY_ID".into(), "testing".into()),
            ("AWS_SECRET_ACCESS_KEY".into(), "testing".into()),
        ];
        all.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        Machine { root, env: all }
    }

    fn repo(&self) -> PathBuf {
        self.root.join("repo")
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(dsv_bin());
        c.args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("DSV_REPO", self.repo())
            .current_dir(&self.root);
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("dsv runs")
    }

    fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "dsv {args:?} failed: {}{}",
            stderr(&o),
            String::from_utf8_lossy(&o.stdout)
        );
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    }

    /// `dsv init AT --metadata URL --objects OBJECTS --endpoint ENDPOINT`,
    /// which must succeed.
    fn init_team(&self, at: &Path, url: &str, objects: &str, endpoint: &str) -> String {
        self.ok(&[
            "init",
            at.to_str().unwrap(),
            "--metadata",
            url,
            "--objects",
            objects,
            "--endpoint",
            endpoint,
        ])
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        serde_json::from_str(&self.ok(&all)).unwrap()
    }

    fn spawn(&self, args: &[&str], log: &str) -> Running {
        let f = std::fs::File::create(self.root.join(log)).unwrap();
        Running(
            self.cmd(args)
                .stdout(f.try_clone().unwrap())
                .stderr(f)
                .spawn()
                .expect("dsv starts"),
        )
    }

    /// `dsv ARGS` as a process in a new UTS namespace named `host` (when
    /// root; otherwise on this host).
    fn spawn_as_host(&self, host: &str, args: &[&str], log: &str) -> Running {
        if !is_root() {
            return self.spawn(args, log);
        }
        let f = std::fs::File::create(self.root.join(log)).unwrap();
        let mut script = format!("hostname {host} && exec {}", dsv_bin().display());
        for a in args {
            script.push_str(&format!(" '{a}'"));
        }
        let mut c = Command::new("unshare");
        c.args(["--uts", "sh", "-c", &script])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("DSV_REPO", self.repo())
            .current_dir(&self.root)
            .stdout(f.try_clone().unwrap())
            .stderr(f);
        for (k, v) in &self.env {
            c.env(k, v);
        }
        Running(c.spawn().expect("unshare starts"))
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.root.join(name)).unwrap_or_default()
    }
}

/// A process killed (SIGKILL) when dropped: a failing test leaves no agent
/// running behind it.
struct Running(Child);

impl Running {
    fn kill9(mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
    /// SIGTERM, then wait: agents finish cleanly.
    fn stop(mut self) {
        let _ = Command::new("kill").arg(self.0.id().to_string()).status();
        let _ = self.0.wait();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Polls `f` until it returns `Some` (at most `limit`).
fn until<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Machine 1's labeling session: `folder` as a new reviewed version.
fn sync_reviewed(m: &Machine, folder: &Path) {
    m.ok(&[
        "-q",
        "dataset",
        "sync",
        "sensors/occupancy",
        folder.to_str().unwrap(),
        "--tag",
        "reviewed",
    ]);
}

fn tasks_of(m: &Machine) -> Vec<Value> {
    m.json(&["task", "list", "--project", "sensors"])
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn the_retraining_loop_runs_across_three_machines_and_survives_a_killed_agent() {
    let pg = PgCluster::start();
    pg.create_db("team");
    let s3 = S3Server::start();
    s3.bucket("team");
    // Machine 3 reaches the object store through a proxy that can hang.
    let proxy = FaultProxy::start(s3.port, 0, 0);
    let tmp = tempfile::tempdir().unwrap();
    let url = pg.url("team");

    // Three ways to give the password: PGPASSWORD, ~/.pgpass, PGPASSFILE.
    let m1 = Machine::new(tmp.path(), "m1", &[("PGPASSWORD", PgCluster::PASSWORD)]);
    let m2 = Machine::new(tmp.path(), "m2", &[]);
    let pgpass = format!("127.0.0.1:{}:team:dsv:{}\n", pg.port, PgCluster::PASSWORD);
    let m2_pgpass = m2.root.join("home/.pgpass");
    std::fs::write(&m2_pgpass, &pgpass).unwrap();
    let m3_pass = tmp.path().join("m3-pgpass");
    std::fs::write(&m3_pass, &pgpass).unwrap();
    let m3 = Machine::new(
        tmp.path(),
        "m3",
        &[("PGPASSFILE", m3_pass.to_str().unwrap())],
    );

    // Machine 1 creates the team repository.
    let objects = "s3://team/loop";
    m1.init_team(&m1.repo(), &url, objects, &s3.endpoint());
    let team = std::fs::read_to_string(m1.repo().join(".dsv/team.json")).unwrap();
    assert!(
        !team.contains(PgCluster::PASSWORD),
        "a secret was stored: {team}"
    );
    // A second init on the same database or bucket is refused.
    // As libpq, a password file others can read is not used.
    {
        let o = m2.run(&["connect", "--metadata", &url, m2.repo().to_str().unwrap()]);
        assert!(!o.status.success());
        let e = stderr(&o);
        assert!(e.contains("has group or world access"), "{e}");
        assert!(e.contains(m2_pgpass.to_str().unwrap()), "{e}");
        assert!(!m2.repo().join(".dsv/team.json").exists());
    }
    for f in [&m2_pgpass, &m3_pass] {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let again = m2.run(&[
        "init",
        m2.root.join("other").to_str().unwrap(),
        "--metadata",
        &url,
        "--objects",
        "s3://team/elsewhere",
        "--endpoint",
        &s3.endpoint(),
    ]);
    assert!(!again.status.success());
    assert!(stderr(&again).contains("dsv connect"), "{}", stderr(&again));

    // Machines 2 and 3 attach; machine 3 at the proxy's address.
    let attached = m2.json(&["connect", "--metadata", &url, m2.repo().to_str().unwrap()]);
    assert_eq!(attached["objects"], objects, "{attached}");
    assert!(!attached.to_string().contains(PgCluster::PASSWORD));
    m3.ok(&[
        "connect",
        "--metadata",
        &url,
        "--objects",
        objects,
        "--endpoint",
        &proxy.endpoint(),
        m3.repo().to_str().unwrap(),
    ]);

    // The evaluation data, the training task and the triggers (machine 1).
    let data = occupancy_dir();
    let eval = m1.root.join("eval");
    std::fs::create_dir_all(&eval).unwrap();
    std::fs::copy(data.join("datatest.txt"), eval.join("datatest.txt")).unwrap();
    m1.ok(&[
        "-q",
        "dataset",
        "sync",
        "sensors/occupancy-eval",
        eval.to_str().unwrap(),
    ]);
    let base = m1.ok(&[
        "task",
        "create",
        "sensors/occupancy-model",
        "--trainer",
        "logistic",
        "--set",
        "General/dataset_id=sensors/occupancy",
        "--set",
        "General/test_dataset_id=sensors/occupancy-eval",
        "--set",
        "General/label=Occupancy",
        "--set",
        "General/features=Temperature,Humidity,Light,CO2,HumidityRatio",
    ]);
    m1.ok(&[
        "trigger",
        "add",
        "dataset",
        "retrain",
        "--project",
        "sensors",
        "--dataset",
        "occupancy",
        "--tag",
        "reviewed",
        "--clone",
        &base,
        "--set",
        "General/dataset_id=${dataset.id}",
        "--queue",
        "train",
    ]);
    m1.ok(&[
        "trigger",
        "add",
        "task",
        "promote",
        "--project",
        "sensors",
        "--status",
        "completed",
        "--promote",
        "test/accuracy",
    ]);

    // Machine 2 fires triggers and reaps (requeueing); machine 3 trains.
    let m2_triggers = m2.spawn(
        &[
            "agent",
            "--triggers",
            "--queue",
            "maintenance",
            "--requeue-dead",
        ],
        "triggers.log",
    );
    let m3_agent = m3.spawn_as_host(
        "machine3",
        &[
            "agent",
            "--queue",
            "train",
            "--lease-ttl",
            "3",
            "--name",
            "m3-trainer",
        ],
        "agent.log",
    );
    until("both agents listed", Duration::from_secs(60), || {
        let agents = m1.json(&["agent", "list"]);
        let names: Vec<String> = agents
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["name"].as_str().unwrap().to_string())
            .collect();
        names.iter().any(|n| n == "m3-trainer").then_some(())?;
        (names.len() >= 2).then_some(())
    });

    // Version 1 on machine 1: trained on machine 3, promoted.
    let labels = m1.root.join("labels");
    std::fs::create_dir_all(&labels).unwrap();
    std::fs::copy(
        data.join("datatraining.txt"),
        labels.join("datatraining.txt"),
    )
    .unwrap();
    sync_reviewed(&m1, &labels);
    let first = until(
        "the first model in production",
        Duration::from_secs(120),
        || {
            let models = m1.json(&["model", "list", "--tag", "production"]);
            models.as_array().unwrap().first().cloned()
        },
    );
    let t1 = first["task"].as_str().unwrap().to_string();
    let t1_rec = m1.json(&["task", "show", &t1]);
    assert_eq!(t1_rec["status"], "completed");
    if is_root() {
        assert_eq!(t1_rec["agent"]["host"], "machine3", "{t1_rec}");
    }

    // Version 2 on machine 1, while machine 3 is cut off from the object
    // store: it takes the task and hangs reading the new data.
    proxy.hold.store(true, std::sync::atomic::Ordering::SeqCst);
    std::fs::copy(data.join("datatest2.txt"), labels.join("datatest2.txt")).unwrap();
    sync_reviewed(&m1, &labels);
    let t2 = until(
        "machine 3 running the second task",
        Duration::from_secs(120),
        || {
            tasks_of(&m1).into_iter().find_map(|t| {
                let id = t["id"].as_str()?.to_string();
                (id != t1 && t["status"] == "running").then_some(id)
            })
        },
    );
    let running = m1.json(&["task", "show", &t2]);
    assert_eq!(running["agent"]["name"], "m3-trainer", "{running}");
    // SIGKILL: no goodbye, no lease release.
    m3_agent.kill9();

    // Machine 2's reaper requeues it once the lease lapses; an agent on
    // machine 2 completes it.
    let m2_agent = m2.spawn(
        &["agent", "--queue", "train", "--name", "m2-trainer"],
        "agent.log",
    );
    let done = until(
        "the second task completed on machine 2",
        Duration::from_secs(180),
        || {
            let t = m1.json(&["task", "show", &t2]);
            (t["status"] == "completed").then_some(t)
        },
    );
    assert_eq!(done["agent"]["name"], "m2-trainer", "{done}");
    // The promotion gate judged it (promoted or kept the better one).
    let model2 = until("the second task's model", Duration::from_secs(30), || {
        m1.json(&["model", "list"])
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["task"] == t2.as_str())
            .map(|m| m["id"].as_str().unwrap().to_string())
    });
    let start = Instant::now();
    loop {
        let h = m1.json(&["trigger", "history", "promote"]);
        if h.as_array()
            .unwrap()
            .iter()
            .any(|f| f["model"] == model2.as_str())
        {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no gate decision on {t2}: {h}\nevents: {}\ntriggers.log: {}",
            m1.ok(&["events"]),
            m2.log("triggers.log")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    m2_agent.stop();
    m2_triggers.stop();

    // Exactly once: one firing per version, one task per firing, two
    // versions.
    let versions = m1.json(&["dataset", "list", "sensors/occupancy"]);
    let versions = versions.as_array().unwrap();
    assert_eq!(versions.len(), 2, "{versions:?}");
    let fired = m1.json(&["trigger", "history", "retrain"]);
    let fired = fired.as_array().unwrap();
    assert_eq!(fired.len(), 2, "{fired:?}");
    let mut subjects: Vec<&str> = fired
        .iter()
        .map(|f| f["subject"].as_str().unwrap())
        .collect();
    subjects.sort();
    subjects.dedup();
    assert_eq!(subjects.len(), 2, "a version fired twice: {fired:?}");
    let launched: Vec<Value> = tasks_of(&m1)
        .into_iter()
        .filter(|t| t["id"].as_str() != Some(base.as_str()))
        .collect();
    assert_eq!(launched.len(), 2, "{launched:?}");
    assert!(
        launched.iter().all(|t| t["status"] == "completed"),
        "{launched:?}"
    );
    // The second task's model was judged once.
    let gate = m1.json(&["trigger", "history", "promote"]);
    let judged = gate
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["model"] == model2.as_str())
        .count();
    assert_eq!(judged, 1, "{gate}");

    // The event log as SQL readers see it (`dsv_events`): numbered 1..n
    // without a gap although agents on two machines appended concurrently
    // (task events are numbered at commit), each record carrying its number.
    let o = pg.psql(
        "team",
        "SELECT count(*), min(seq), max(seq), count(DISTINCT seq), \
                count(*) FILTER (WHERE (event->>'seq')::bigint <> seq OR kind IS NULL), \
                count(*) FILTER (WHERE kind = 'task_status') \
         FROM dsv_events",
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let row: Vec<i64> = String::from_utf8_lossy(&o.stdout)
        .trim()
        .split('|')
        .map(|x| x.parse().unwrap())
        .collect();
    assert_eq!(row[1], 1, "{row:?}");
    assert_eq!(row[0], row[2], "a gap in the event log: {row:?}");
    assert_eq!(row[0], row[3], "{row:?}");
    assert_eq!(row[4], 0, "records without their number or kind: {row:?}");
    assert!(row[5] >= 6, "task events missing: {row:?}");

    // Every machine sees the agents; machine 3's is not "stopped".
    let agents = m2.json(&["agent", "list"]);
    let m3_row = agents
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "m3-trainer")
        .cloned()
        .expect("machine 3's agent listed");
    // Killed while running: its record still says so (or "lost" once it
    // has been silent past the 30 s floor) — never a clean "stopped".
    assert!(
        m3_row["state"] == "running" || m3_row["state"] == "lost",
        "{m3_row}"
    );
    if is_root() {
        assert_eq!(m3_row["host"], "machine3", "{m3_row}");
    }
    assert!(agents
        .as_array()
        .unwrap()
        .iter()
        .any(|a| a["name"] == "m2-trainer" && a["state"] == "stopped"));

    // Every machine reads everything back, checked, after a gc (which
    // finds every version and model live: nothing to free).
    proxy.hold.store(false, std::sync::atomic::Ordering::SeqCst);
    let gc = m2.json(&["gc"]);
    assert_eq!(gc["dead_chunks"], 0, "{gc}");
    assert_eq!(gc["packs_deleted"], 0, "{gc}");
    for m in [&m1, &m2] {
        let report = m.json(&["fsck", "--read-data"]);
        assert_eq!(report["ok"], true, "{report}");
    }
    let cat = m2.run(&["dataset", "cat", "sensors/occupancy", "datatest2.txt"]);
    assert!(cat.status.success(), "{}", stderr(&cat));
    assert_eq!(
        cat.stdout,
        std::fs::read(data.join("datatest2.txt")).unwrap()
    );
    // A backup of the team's datasets on another remote: m2 pushes chunks
    // of packs other machines wrote, read from the team's object store; a
    // plain clone of the backup reads every file back, checked.
    let backup = m2.root.join("backup");
    m2.ok(&["remote", "add", "origin", backup.to_str().unwrap()]);
    let pushed = m2.json(&["push", "origin"]);
    assert!(pushed["chunks"].as_u64().unwrap() > 0, "{pushed}");
    let restored = m2.root.join("restored");
    m2.ok(&[
        "clone",
        backup.to_str().unwrap(),
        restored.to_str().unwrap(),
        "--full",
    ]);
    let mut c = m2.cmd(&["fsck", "--read-data"]);
    c.env("DSV_REPO", &restored);
    let o = c.output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let mut c = m2.cmd(&["dataset", "cat", "sensors/occupancy", "datatest2.txt"]);
    c.env("DSV_REPO", &restored);
    assert_eq!(
        c.output().unwrap().stdout,
        std::fs::read(data.join("datatest2.txt")).unwrap()
    );
    // A dataset made elsewhere and pushed to that remote comes in with a
    // fetch: its data reaches the team's object store before its versions
    // reach the team, so m1 — which never fetched and has no copy of the
    // remote's packs — reads it at once, checked.
    let extra = m2.root.join("extra");
    std::fs::create_dir_all(&extra).unwrap();
    let body = dsv_tests::noise(9, 400_000);
    std::fs::write(extra.join("new.bin"), &body).unwrap();
    let mut c = m2.cmd(&[
        "-q",
        "dataset",
        "sync",
        "lab/extra",
        extra.to_str().unwrap(),
    ]);
    c.env("DSV_REPO", &restored);
    assert!(c.output().unwrap().status.success());
    let mut c = m2.cmd(&["push", "origin"]);
    c.env("DSV_REPO", &restored);
    let o = c.output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let fetched = m2.json(&["fetch", "origin"]);
    assert!(fetched["chunks"].as_u64().unwrap() > 0, "{fetched}");
    let cat = m1.run(&["dataset", "cat", "lab/extra", "new.bin"]);
    assert!(cat.status.success(), "{}", stderr(&cat));
    assert_eq!(cat.stdout, body);
    // An index rebuild reads every pack on the object store and finds the
    // shared index complete: nothing to add or repoint.
    let r = m2.json(&["fsck", "--rebuild-index"]);
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["rebuilt"]["chunks"]["added"], 0, "{r}");
    assert_eq!(r["rebuilt"]["chunks"]["repointed"], 0, "{r}");
    assert!(
        r["rebuilt"]["chunks"]["packs"].as_u64().unwrap() >= 2,
        "{r}"
    );
    let _ = (m1.log("x"), m3.log("agent.log"));
}

#[test]
fn bad_team_addresses_and_credentials_are_named_and_create_nothing() {
    let pg = PgCluster::start();
    pg.create_db("t");
    let s3 = S3Server::start();
    s3.bucket("bkt");
    let tmp = tempfile::tempdir().unwrap();
    let m = Machine::new(tmp.path(), "m", &[("PGPASSWORD", "wrong")]);
    let target = m.root.join("r");
    let init = |m: &Machine, url: &str, objects: &str| {
        m.run(&[
            "init",
            target.to_str().unwrap(),
            "--metadata",
            url,
            "--objects",
            objects,
            "--endpoint",
            &s3.endpoint(),
        ])
    };
    // Wrong password: named, the password never printed, nothing created.
    let o = init(&m, &pg.url("t"), "s3://bkt/x");
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("refused the credentials"), "{e}");
    assert!(e.contains(&format!("127.0.0.1:{}/t", pg.port)), "{e}");
    assert!(!e.contains("wrong"), "{e}");
    assert!(!target.exists());
    // Nothing listens there.
    let m = Machine::new(tmp.path(), "m2", &[("PGPASSWORD", PgCluster::PASSWORD)]);
    let dead = format!("postgres://dsv@127.0.0.1:{}/t", dsv_tests::free_port());
    let o = init(&m, &dead, "s3://bkt/x");
    assert!(!o.status.success());
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("127.0.0.1"), "{}", stderr(&o));
    assert!(!target.exists());
    // A missing bucket.
    let o = init(&m, &pg.url("t"), "s3://nobucket/x");
    assert!(!o.status.success());
    assert!(stderr(&o).contains("nobucket"), "{}", stderr(&o));
    assert!(!target.exists());
    // Connecting to a database without a team repository.
    let o = m.run(&[
        "connect",
        "--metadata",
        &pg.url("t"),
        target.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("holds no team repository"),
        "{}",
        stderr(&o)
    );
    assert!(!target.exists());
    // A schema from a newer dsv is refused before anything is read.
    m.init_team(&target, &pg.url("t"), "s3://bkt/x", &s3.endpoint());
    let o = pg.psql(
        "t",
        "INSERT INTO dsv_schema (version, written_by) VALUES (7, 'dsv 9')",
    );
    assert!(o.status.success());
    let mut c = m.cmd(&["dataset", "list"]);
    c.env("DSV_REPO", &target);
    let o = c.output().unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("schema"), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("unsupported format version 7"),
        "{}",
        stderr(&o)
    );
    // A password given in the URL is used but never stored or printed:
    // not in team.json, not in the object store's marker, not in the output.
    let nopw = Machine::new(tmp.path(), "nopw", &[]);
    let with_pw = nopw.root.join("r");
    pg.create_db("t2");
    let o = nopw.run(&[
        "--json",
        "init",
        with_pw.to_str().unwrap(),
        "--metadata",
        &pg.url_with_password("t2"),
        "--objects",
        "s3://bkt/pw",
        "--endpoint",
        &s3.endpoint(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (_, marker) = s3.request("GET", "/bkt/pw/dsv-team.json", b"").unwrap();
    let team_json = std::fs::read_to_string(with_pw.join(".dsv/team.json")).unwrap();
    for (what, text) in [
        ("stdout", String::from_utf8_lossy(&o.stdout).to_string()),
        ("team.json", team_json),
        ("marker", String::from_utf8_lossy(&marker).to_string()),
    ] {
        assert!(text.contains("127.0.0.1"), "{what}: {text}");
        assert!(
            !text.contains(PgCluster::PASSWORD),
            "{what} holds the password: {text}"
        );
    }
    // Later commands need it from PGPASSWORD or .pgpass: they say so.
    let mut c = nopw.cmd(&["dataset", "list"]);
    c.env("DSV_REPO", &with_pw);
    let o = c.output().unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("PGPASSWORD"), "{}", stderr(&o));
    // The same as a query parameter.
    let other = Machine::new(tmp.path(), "qpw", &[]);
    let q = format!("{}?password={}", pg.url("t2"), PgCluster::PASSWORD);
    let o = other.run(&["connect", "--metadata", &q, other.repo().to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let team_json = std::fs::read_to_string(other.repo().join(".dsv/team.json")).unwrap();
    assert!(!team_json.contains(PgCluster::PASSWORD), "{team_json}");
    assert!(!String::from_utf8_lossy(&o.stdout).contains(PgCluster::PASSWORD));

    // The database down: a clear error, exit code 2; back up: works.
    let o = pg.psql("t", "DELETE FROM dsv_schema WHERE version = 7");
    assert!(o.status.success());
    pg.stop();
    let mut c = m.cmd(&["dataset", "list"]);
    c.env("DSV_REPO", &target);
    let o = c.output().unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains(&format!("127.0.0.1:{}", pg.port)),
        "{}",
        stderr(&o)
    );
    pg.restart();
    let mut c = m.cmd(&["dataset", "list"]);
    c.env("DSV_REPO", &target);
    assert!(c.output().unwrap().status.success());
}

#[test]
fn an_embedded_repository_graduates_into_a_team_with_its_history() {
    let pg = PgCluster::start();
    pg.create_db("grad");
    let s3 = S3Server::start();
    s3.bucket("grad");
    let tmp = tempfile::tempdir().unwrap();
    let lab = Machine::new(tmp.path(), "lab", &[("PGPASSWORD", PgCluster::PASSWORD)]);
    let url = pg.url("grad");
    lab.init_team(&lab.root.join("team"), &url, "s3://grad/t", &s3.endpoint());
    // An embedded repository with two versions and a model.
    let emb = lab.root.join("embedded");
    lab.ok(&["init", emb.to_str().unwrap()]);
    let e = |args: &[&str]| {
        let mut c = lab.cmd(args);
        c.env("DSV_REPO", &emb);
        let o = c.output().unwrap();
        assert!(o.status.success(), "dsv {args:?}: {}", stderr(&o));
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    let data = occupancy_dir();
    let d = lab.root.join("d");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::copy(data.join("datatraining.txt"), d.join("datatraining.txt")).unwrap();
    e(&[
        "-q",
        "dataset",
        "sync",
        "occ/data",
        d.to_str().unwrap(),
        "--tag",
        "reviewed",
    ]);
    std::fs::copy(data.join("datatest.txt"), d.join("datatest.txt")).unwrap();
    e(&["-q", "dataset", "sync", "occ/data", d.to_str().unwrap()]);
    let task = e(&[
        "task",
        "create",
        "occ/m",
        "--trainer",
        "logistic",
        "--set",
        "General/dataset_id=occ/data",
        "--set",
        "General/label=Occupancy",
        "--set",
        "General/features=Temperature,Humidity,Light,CO2,HumidityRatio",
    ]);
    e(&["-q", "task", "run", &task]);
    let before: Value =
        serde_json::from_str(&e(&["--json", "dataset", "list", "occ/data"])).unwrap();
    let models: Value = serde_json::from_str(&e(&["--json", "model", "list"])).unwrap();

    let out: Value = serde_json::from_str(&e(&["--json", "push", &url, "occ/data"])).unwrap();
    assert_eq!(out["versions_added"], 2, "{out}");
    assert_eq!(out["models_added"], 1, "{out}");
    // Nothing of the staging is left behind.
    assert!(!std::fs::read_dir(emb.join(".dsv")).unwrap().any(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .starts_with("graduate-")));

    // Another machine sees the same history (same ids, tags) and reads it.
    let other = Machine::new(tmp.path(), "other", &[("PGPASSWORD", PgCluster::PASSWORD)]);
    other.ok(&[
        "connect",
        "--metadata",
        &url,
        other.repo().to_str().unwrap(),
    ]);
    let after = other.json(&["dataset", "list", "occ/data"]);
    let ids = |v: &Value| -> Vec<(String, String)> {
        let mut x: Vec<(String, String)> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|r| (r["id"].to_string(), r["tags"].to_string()))
            .collect();
        x.sort();
        x
    };
    assert_eq!(ids(&before), ids(&after));
    let team_models = other.json(&["model", "list"]);
    assert_eq!(team_models[0]["id"], models[0]["id"], "{team_models}");
    let cat = other.run(&["dataset", "cat", "occ/data@1.0.1", "datatest.txt"]);
    assert_eq!(
        cat.stdout,
        std::fs::read(data.join("datatest.txt")).unwrap()
    );
    // An ordinary user reads it too (through the machine's chunk cache).
    if is_root() {
        dsv_tests::open_to_everyone(&other.root);
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(dsv_bin())
            .args(["dataset", "cat", "occ/data@1.0.0", "datatraining.txt"])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("DSV_REPO", other.repo())
            .env("HOME", other.root.join("home"))
            .env("PGPASSWORD", PgCluster::PASSWORD)
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing");
        let o = c.output().unwrap();
        assert!(o.status.success(), "as nobody: {}", stderr(&o));
        assert_eq!(
            o.stdout,
            std::fs::read(data.join("datatraining.txt")).unwrap()
        );
    }
    assert_eq!(other.json(&["fsck", "--read-data"])["ok"], true);
    // Pushing again adds nothing.
    let again: Value = serde_json::from_str(&e(&["--json", "push", &url, "occ/data"])).unwrap();
    assert_eq!(again["versions_added"], 0, "{again}");
}

fn local_packs(m: &Machine) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(m.repo().join(".dsv/packs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".pack"))
        .collect();
    v.sort();
    v
}

/// `gc` on a team repository, run on a machine that wrote none of the
/// packs: a pack with nothing live is deleted from the object store, one
/// mostly dead is rewritten (its live records read from the object store)
/// and published before the index moves, an unindexed pack counts as an
/// interrupted writer's only once older than the grace period — and every
/// machine still reads everything live, checked, from its new place. A
/// lost shared index is rebuilt from the object store's packs, never while
/// a gc runs. The database role is an ordinary one that owns the database.
#[test]
fn team_gc_frees_what_no_machine_needs_and_every_machine_reads_the_rest() {
    let pg = PgCluster::start();
    // As a DBA would set it up: an ordinary role (no superuser, no
    // CREATEDB) that owns the team's database.
    for sql in [
        "CREATE ROLE team LOGIN PASSWORD 'team-pw' NOSUPERUSER NOCREATEDB NOCREATEROLE",
        "CREATE DATABASE gc OWNER team",
    ] {
        let o = pg.psql("postgres", sql);
        assert!(o.status.success(), "{sql}: {}", stderr(&o));
    }
    let s3 = S3Server::start();
    s3.bucket("gcb");
    let tmp = tempfile::tempdir().unwrap();
    let env = [("PGPASSWORD", "team-pw")];
    let a = Machine::new(tmp.path(), "a", &env);
    let b = Machine::new(tmp.path(), "b", &env);
    let url = pg.url("gc").replace("dsv@", "team@");
    a.init_team(&a.repo(), &url, "s3://gcb/t", &s3.endpoint());
    b.ok(&["connect", "--metadata", &url, b.repo().to_str().unwrap()]);
    let shared = dsv_tests::noise(1, 300_000);
    let sync = |name: &str, files: &[(&str, Vec<u8>)]| {
        let dir = a.root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        for (f, body) in files {
            std::fs::write(dir.join(f), body).unwrap();
        }
        a.ok(&[
            "-q",
            "dataset",
            "sync",
            &format!("g/{name}"),
            dir.to_str().unwrap(),
        ]);
    };
    // x's pack holds shared.bin (y uses it too) and a bigger only-x.bin;
    // z's pack holds only z's file.
    sync(
        "x",
        &[
            ("shared.bin", shared.clone()),
            ("only-x.bin", dsv_tests::noise(2, 600_000)),
        ],
    );
    sync("y", &[("shared.bin", shared.clone())]);
    sync("z", &[("z.bin", dsv_tests::noise(3, 200_000))]);
    let packs_before = s3.keys("gcb", "t/packs/");
    assert_eq!(packs_before.len(), 2, "{packs_before:?}");
    a.ok(&["dataset", "delete", "g/x"]);
    a.ok(&["dataset", "delete", "g/z"]);
    // A pack a writer published and never committed (it died between).
    let orphan = "t/packs/00000000000abcde.pack";
    let put = s3.request("PUT", &format!("/gcb/{orphan}"), b"not committed");
    assert!(matches!(put, Some((200, _))), "{put:?}");

    // The plan: z's pack deleted, x's rewritten; the fresh orphan is left
    // alone (it could be a writer's about to commit). Nothing changes.
    let plan = b.json(&["gc", "--dry-run"]);
    assert_eq!(plan["packs_deleted"], 1, "{plan}");
    assert_eq!(plan["packs_repacked"], 1, "{plan}");
    assert_eq!(plan["orphan_packs"], 0, "{plan}");
    let mut all_before = packs_before.clone();
    all_before.push(orphan.to_string());
    all_before.sort();
    assert_eq!(s3.keys("gcb", "t/packs/"), all_before);

    let r = b.json(&["gc", "--orphan-grace", "0"]);
    assert_eq!(r["packs_deleted"], 2, "{r}");
    assert_eq!(r["packs_repacked"], 1, "{r}");
    assert_eq!(r["orphan_packs"], 1, "{r}");
    assert!(r["dead_chunks"].as_u64().unwrap() >= 2, "{r}");
    assert!(r["bytes_freed"].as_u64().unwrap() > 700_000, "{r}");
    let packs_after = s3.keys("gcb", "t/packs/");
    assert_eq!(packs_after.len(), 1, "{packs_after:?}");
    assert!(
        !packs_before.contains(&packs_after[0]),
        "the live records moved to a new pack: {packs_after:?}"
    );
    // The new pack is b's; a still holds its old copies until its own gc.
    assert_eq!(
        local_packs(&b),
        vec![packs_after[0]["t/packs/".len()..].to_string()]
    );
    assert_eq!(local_packs(&a).len(), 2);

    // Both machines read what is live from its new place, checked.
    for m in [&a, &b] {
        let cat = m.run(&["dataset", "cat", "g/y", "shared.bin"]);
        assert!(cat.status.success(), "{}", stderr(&cat));
        assert_eq!(cat.stdout, shared);
        let report = m.json(&["fsck", "--read-data"]);
        assert_eq!(report["ok"], true, "{report}");
    }
    // a's gc finds nothing more to free on the object store, and drops its
    // own copies of the packs b's gc deleted.
    let r = a.json(&["gc", "--orphan-grace", "0"]);
    assert_eq!(r["packs_deleted"], 0, "{r}");
    assert_eq!(r["dead_chunks"], 0, "{r}");
    assert!(local_packs(&a).is_empty(), "{:?}", local_packs(&a));
    assert_eq!(s3.keys("gcb", "t/packs/"), packs_after);
    let cat = a.run(&["dataset", "cat", "g/y", "shared.bin"]);
    assert_eq!(cat.stdout, shared);

    // The shared chunk index loses its entries (a bad restore): fsck says
    // so, and a rebuild on a — which holds no pack of its own now — reads
    // the packs on the object store and restores every entry.
    let o = pg.psql("gc", "DELETE FROM dsv_kv WHERE cf = 1");
    assert!(o.status.success(), "{}", stderr(&o));
    let o = a.run(&["fsck"]);
    assert!(!o.status.success(), "fsck misses nothing?");
    // While a gc holds the maintenance lease (its commit held open), the
    // rebuild is refused, naming it: it must not index a pack the gc is
    // deleting.
    let mut gc = b.spawn(&["gc", "--hold-commit-ms", "3000"], "gc.log");
    until(
        "the gc's maintenance lease",
        Duration::from_secs(30),
        || {
            let o = pg.psql(
                "gc",
                "SELECT count(*) FROM dsv_kv WHERE cf = 7 AND k = 'maintenance'::bytea",
            );
            (String::from_utf8_lossy(&o.stdout).trim() == "1").then_some(())
        },
    );
    let o = a.run(&["fsck", "--rebuild-index"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("'gc' by"), "{}", stderr(&o));
    assert!(gc.0.wait().unwrap().success(), "{}", b.log("gc.log"));
    let r = a.json(&["fsck", "--rebuild-index"]);
    assert_eq!(r["rebuilt"]["chunks"]["packs"], 1, "{r}");
    assert!(
        r["rebuilt"]["chunks"]["added"].as_u64().unwrap() >= 1,
        "{r}"
    );
    assert_eq!(r["ok"], true, "{r}");
    for m in [&a, &b] {
        let report = m.json(&["fsck", "--read-data"]);
        assert_eq!(report["ok"], true, "{report}");
        let cat = m.run(&["dataset", "cat", "g/y", "shared.bin"]);
        assert_eq!(cat.stdout, shared);
    }
}

/// A machine whose clock is two hours behind (libfaketime) runs an agent:
/// its task's lease and its heartbeats are in the database's time, so
/// another machine neither reaps the task nor shows the agent as lost, and
/// the task completes there. (By its own clock the lease would have run
/// out two hours ago.)
#[test]
fn leases_use_the_database_clock_so_a_machine_with_a_wrong_clock_keeps_its_task() {
    let pg = PgCluster::start();
    pg.create_db("clock");
    let s3 = S3Server::start();
    s3.bucket("clock");
    let tmp = tempfile::tempdir().unwrap();
    let env = [("PGPASSWORD", PgCluster::PASSWORD)];
    let a = Machine::new(tmp.path(), "a", &env);
    let b = Machine::new(tmp.path(), "b", &env);
    let url = pg.url("clock");
    a.init_team(&a.repo(), &url, "s3://clock/t", &s3.endpoint());
    b.ok(&["connect", "--metadata", &url, b.repo().to_str().unwrap()]);
    let started = tmp.path().join("started");
    let go = tmp.path().join("go");
    // Bounded (60 s): a failing test leaves no endless loop behind.
    let cmd = format!(
        "sh -c 'touch {}; i=0; while [ ! -e {} ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i+1)); done'",
        started.display(),
        go.display()
    );
    let t = a.json(&["task", "create", "clock/wait", "--command", &cmd])["id"]
        .as_str()
        .unwrap()
        .to_string();
    a.json(&["task", "enqueue", &t, "--queue", "q"]);
    let mut c = Command::new("faketime");
    // The wall clock only: a machine whose clock is wrong still counts
    // its timers right.
    c.args(["-m", "--exclude-monotonic", "-f", "-2h"])
        .arg(dsv_bin())
        .args([
            "agent",
            "--once",
            "--queue",
            "q",
            "--name",
            "behind",
            "--lease-ttl",
            "5",
        ])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DSV_REPO", b.repo())
        .current_dir(&b.root)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(b.root.join("agent.log")).unwrap());
    for (k, v) in &b.env {
        c.env(k, v);
    }
    let agent = Running(
        c.spawn()
            .expect("faketime runs (scripts/setup installs it)"),
    );
    until("the task to start", Duration::from_secs(60), || {
        started.exists().then_some(())
    });
    // It really runs two hours behind.
    let skew = Command::new("faketime")
        .args(["-f", "-2h", "date", "+%s"])
        .output()
        .unwrap();
    let behind: i64 = String::from_utf8_lossy(&skew.stdout)
        .trim()
        .parse()
        .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(now - behind > 7000, "faketime does not shift the clock");
    // Past a whole lease of 5 s, renewed by heartbeats in the database's
    // time: nothing to reap, the agent is heard from.
    let renewed = until("a renewed lease", Duration::from_secs(30), || {
        let task = a.json(&["task", "show", &t]);
        let renewed = task["lease"]["renewed_ms"].as_i64()?;
        let start = task["started_ms"].as_i64()?;
        (renewed - start > 5_000).then_some(task)
    });
    let lease = &renewed["lease"];
    assert!(
        lease["expires_ms"].as_i64().unwrap() - lease["renewed_ms"].as_i64().unwrap() == 5_000,
        "{renewed}"
    );
    let reaped = a.json(&["task", "reap"]);
    assert_eq!(reaped["reaped"], serde_json::json!([]), "{reaped}");
    let agents = a.json(&["agent", "list"]);
    let row = agents
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "behind")
        .cloned()
        .unwrap_or_default();
    assert_eq!(row["state"], "running", "{agents}");
    std::fs::write(&go, b"").unwrap();
    let mut agent = agent;
    let status = agent.0.wait().unwrap();
    assert!(status.success(), "{}", b.log("agent.log"));
    let task = a.json(&["task", "show", &t]);
    assert_eq!(task["status"], "completed", "{task}");
}
