//! # dsv-remote
//!
//! Remotes for dsv repositories: packs on object storage (S3 and
//! S3-compatible servers, GCS, Azure) or in a folder, and the git-style
//! operations over them — `push`, `fetch`, `pull`, `clone`, lazy reads of
//! chunks a clone has not downloaded, `prefetch`.
//!
//! A remote is self-contained: chunks *and* metadata objects live in
//! self-describing packs (see [`dsv_store::bundle`]), a small JSON document
//! per dataset lists its versions with their tags, and a manifest names the
//! layout's format. A bucket alone is enough to rebuild a repository.
//! Dataset documents are only ever replaced with a conditional write
//! (`If-Match` the version read, or `If-None-Match: *` for a new one), so
//! two repositories pushing to one dataset at once never lose a version:
//! the second is told to pull first. `docs/FORMAT.md` specifies the layout.
//!
//! This crate never prints and never reads the environment: credentials
//! and client options come from the caller ([`Connect`]).

pub mod cache;
pub mod doc;
pub mod error;
pub mod gc;
pub mod keys;
pub mod lease;
pub mod objects;
pub mod objstore;
pub mod open;
pub mod ops;
pub mod source;
pub mod team;

pub use error::{Error, Result};
pub use keys::RemoteRecord;
pub use open::{open_storage, Connect};
pub use ops::{
    add_remote, clone_into, fetch, get_remote, prefetch, push, remotes, remove_remote,
    sync_and_push, CloneOptions, FetchMode, FetchReport, NoProgress, Progress, PushReport,
    PushTarget,
};
pub use source::attach;
