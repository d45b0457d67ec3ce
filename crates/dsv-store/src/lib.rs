//! # dsv-store
//!
//! The dsv storage engine: a git-like, embedded store for datasets.
//!
//! - Files are cut into content-defined chunks ([`chunker`]), identified by
//!   BLAKE3 ([`id`]), compressed with zstd ([`compress`]) and appended once
//!   per repository to pack files ([`pack`]), whatever file, version or
//!   dataset they came from.
//! - Files, directories and versions are content-addressed objects with a
//!   documented canonical encoding ([`object`]); large directories are split
//!   into hashed shards ([`tree`]).
//! - A version DAG with refs, tags and drafts lives in a small key-value
//!   schema ([`schema`]) behind a seam ([`kv`]) with RocksDB and in-memory
//!   implementations; every mutation is one atomic batch ([`Store::write`]).
//! - Reads stream files and diff versions in time proportional to what
//!   changed ([`diff`]); [`Store::verify`] and [`Store::gc`] check and clean.
//!
//! This crate never prints and never reads the environment.

pub mod bundle;
pub mod chunker;
pub mod codec;
pub mod compress;
pub mod config;
pub mod diff;
pub mod error;
pub mod gc;
pub mod id;
pub mod import;
pub mod ingest;
pub mod kv;
pub mod lock;
pub mod object;
pub mod pack;
pub mod rebuild;
pub mod schema;
pub mod stats;
pub mod storage;
pub mod store;
pub mod tree;
pub mod txn;
pub mod upgrade;
pub mod verify;

pub use chunker::{Chunker, ChunkerParams};
pub use config::RepoConfig;
pub use diff::{Diff, Modified, PathEntry, Renamed};
pub use error::{Error, Kind, Result};
pub use gc::{GcOptions, GcReport};
pub use id::{ChunkId, DraftId, HexPrefix, ObjectId, VersionId};
pub use ingest::{CommitOutcome, IngestOptions, StageMode};
pub use kv::{Batch, Cf, KvRead};
pub use object::{Delta, Entry, EntryTarget, FileObject, VersionObject};
pub use rebuild::{EvictReport, RebuildReport};
pub use stats::Stats;
pub use storage::{ChunkSource, FetchedChunk, LocalDir, PackStorage, PutMode, PutOutcome};
pub use store::{Draft, NoProgress, Progress, StageReport, Store, StoreOptions, Version};
pub use tree::Change;
pub use txn::Subscription;
pub use upgrade::UpgradeReport;
pub use verify::{Problem, RepairReport, VerifyOptions, VerifyReport};
