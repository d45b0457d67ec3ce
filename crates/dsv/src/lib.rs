//! # dsv — the porcelain
//!
//! Datasets with ClearML Data semantics over the [`dsv_store`] engine:
//! projects and names, semantic versions, drafts that finalize into
//! immutable versions, tags, user metadata, merges, squash, delete, and an
//! event log that records every mutation in the same atomic write (the
//! triggers consume it).
//!
//! ```no_run
//! use dsv::{Repo, CreateOptions, AddOptions};
//! # fn main() -> dsv::Result<()> {
//! let repo = Repo::open(std::path::Path::new(".dsv"), Default::default())?;
//! // Get-or-create the dataset and start a writable copy of its latest version.
//! let draft = repo.writable_copy_or_create("sensors", "occupancy", &CreateOptions::default())?;
//! // Add what the labeler just finished, under a path inside the dataset.
//! repo.add(&draft, &[std::path::PathBuf::from("labeled/day-07.csv")],
//!          &AddOptions { dataset_path: "days".into(), ..Default::default() })?;
//! let version = repo.finalize(&draft)?;
//! println!("{} {}", version.version, version.id);
//! # Ok(()) }
//! ```
//!
//! This crate never prints and never reads the environment.

pub mod agents;
pub mod cache;
pub mod error;
pub mod events;
pub mod exchange;
pub mod index;
pub mod keys;
pub mod mount;
pub mod params;
pub mod preview;
pub mod reader;
pub mod records;
pub mod repo;
pub mod rev;
pub mod task;
pub mod trigger;
pub mod upgrade;

pub use cache::{
    Cache, CacheCheck, CacheConfig, CacheEntry, CacheProblem, CacheSize, CopyReport, EntryDamage,
    FolderMismatch, FolderReport, GetLocalOptions, LocalCopy, Pin, PruneOptions, PruneReport,
    Stamp,
};
pub use error::{Error, Result};
pub use events::{Event, EventKind};
pub use preview::{ColumnStats, FilePreview};
pub use reader::FileReader;
pub use records::{DatasetId, DatasetRecord, DraftInfo, VersionInfo};
pub use repo::{
    AddOptions, AddReport, Changes, CreateOptions, Dataset, DatasetVersion, DraftHandle, FileItem,
    GetQuery, Got, PathPattern, Repo, Resolved, SyncOptions, SyncOutcome, VerifyMismatch,
};
pub use rev::RevSpec;
pub use task::{AgentInfo, Beat, CanaryVerdict, Finish, Lease, Model, Task, TaskStatus};
pub use trigger::{Action, Firing, Trigger};

pub use dsv_store;
