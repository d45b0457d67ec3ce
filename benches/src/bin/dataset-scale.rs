//! Builds a repository with many versions of one dataset (each changes one
//! file), for timing `dsv dataset show / list / diff` at scale.
//!
//! ```text
//! dataset-scale REPO_DIR [VERSIONS]     # default 10,000
//! ```

use std::path::PathBuf;
use std::time::Instant;

use dsv::{Repo, SyncOptions};
use dsv_store::{RepoConfig, StoreOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let dir = PathBuf::from(
        args.get(1)
            .ok_or("usage: dataset-scale REPO_DIR [VERSIONS]")?,
    );
    let n: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(10_000);
    let dot = dir.join(".dsv");
    let repo = if dot.join("config.json").exists() {
        Repo::open(&dot, StoreOptions::default())?
    } else {
        Repo::init(&dot, RepoConfig::default(), StoreOptions::default())?
    };
    let work = dir.join("work");
    std::fs::create_dir_all(&work)?;
    for f in 0..20 {
        std::fs::write(work.join(format!("file-{f:02}.csv")), format!("x\n{f}\n"))?;
    }
    let t = Instant::now();
    for i in 0..n {
        std::fs::write(
            work.join(format!("file-{:02}.csv", i % 20)),
            format!("x\n{i}\nedit\n"),
        )?;
        let out = repo.sync("bench", "many", &work, &SyncOptions::default())?;
        if out.version.is_none() {
            return Err(format!("iteration {i} created no version").into());
        }
        if (i + 1) % 1000 == 0 {
            eprintln!("{} versions, {:.1}s", i + 1, t.elapsed().as_secs_f64());
        }
    }
    Ok(())
}
