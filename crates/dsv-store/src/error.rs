//! The store's error type. Every variant names the thing at fault.

use std::path::PathBuf;

use crate::id::{ChunkId, DraftId, ObjectId, ParseIdError, VersionId};

/// Result alias for the store.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What kind of thing a lookup was for (used in `NotFound` / `Ambiguous`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A chunk.
    Chunk,
    /// A file manifest or tree node.
    Object,
    /// A version.
    Version,
    /// A draft.
    Draft,
    /// A ref.
    Ref,
    /// A path inside a version.
    Path,
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kind::Chunk => "chunk",
            Kind::Object => "object",
            Kind::Version => "version",
            Kind::Draft => "draft",
            Kind::Ref => "ref",
            Kind::Path => "path",
        })
    }
}

/// Every failure the storage engine reports.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O error on a named file.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or folder.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// An input file or folder (the user's data, not the repository) could
    /// not be read.
    #[error("cannot {op} {path}: {source}")]
    Input {
        /// What was being done.
        op: &'static str,
        /// The file or folder.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The operating system's random generator failed (ids and salts come
    /// from it).
    #[error("the operating system's random generator failed: {0}")]
    Random(#[source] std::io::Error),
    /// The key-value backend failed.
    #[error("database error: {0}")]
    Kv(String),
    /// No repository at the path.
    #[error("no dsv repository at {0}")]
    NotARepository(PathBuf),
    /// `init` on a path that already holds a repository.
    #[error("a dsv repository already exists at {0}")]
    AlreadyExists(PathBuf),
    /// The repository was written by a newer (or unknown) format.
    #[error("unsupported format version {found} in {what} (this dsv reads up to {supported})")]
    UnsupportedFormatVersion {
        /// Where the version was read.
        what: String,
        /// The version found.
        found: u32,
        /// The newest version this build reads.
        supported: u32,
    },
    /// A repository of an older format: `dsv upgrade` converts it.
    #[error("repository at {} has format {found}; run `dsv upgrade` (this dsv uses format {current})", repo.display())]
    NeedsUpgrade {
        /// The repository folder.
        repo: PathBuf,
        /// Its format.
        found: u32,
        /// This build's format.
        current: u32,
    },
    /// `config.json` lists `incompat` features this build does not know.
    #[error("repository at {} uses features this dsv does not know: {} (incompat: it cannot be opened); upgrade dsv", repo.display(), features.join(", "))]
    UnknownFeatures {
        /// The repository folder.
        repo: PathBuf,
        /// The unknown features.
        features: Vec<String>,
    },
    /// A write to a repository whose `config.json` lists `ro_compat`
    /// features this build does not know.
    #[error("repository at {} uses features this dsv does not know: {} (ro_compat: it can be read but not written); upgrade dsv to change it", repo.display(), features.join(", "))]
    ReadOnlyFeatures {
        /// The repository folder.
        repo: PathBuf,
        /// The unknown features.
        features: Vec<String>,
    },
    /// Stored bytes that do not decode.
    #[error("corrupted {what}: {reason}")]
    Corrupted {
        /// The thing that failed to decode (id, key, file).
        what: String,
        /// Why.
        reason: String,
    },
    /// A chunk whose bytes do not hash to its id.
    #[error("checksum mismatch in chunk {expected}: stored bytes hash to {got}")]
    ChecksumMismatch {
        /// The id the chunk was stored under.
        expected: ChunkId,
        /// The hash of what was read.
        got: ChunkId,
    },
    /// A lookup found nothing.
    #[error("{kind} not found: {what}")]
    NotFound {
        /// What kind of thing.
        kind: Kind,
        /// The id, prefix or name asked for.
        what: String,
    },
    /// A prefix matched several ids.
    #[error("ambiguous {kind} prefix '{prefix}': matches {candidates:?}")]
    Ambiguous {
        /// What kind of thing.
        kind: Kind,
        /// The prefix.
        prefix: String,
        /// Some of the matching ids.
        candidates: Vec<String>,
    },
    /// Bad user input (an id, a path, an option).
    #[error("{0}")]
    Invalid(String),
    /// An id that does not parse.
    #[error(transparent)]
    ParseId(#[from] ParseIdError),
    /// The write lock could not be taken in time.
    #[error("repository is locked by {holder} (waited {waited_ms} ms); retry when it finishes")]
    LockTimeout {
        /// Who holds it (pid, command, since).
        holder: String,
        /// How long we waited.
        waited_ms: u64,
    },
    /// A draft that no longer accepts changes.
    #[error("draft {0} is already finalized as version {1}")]
    DraftFinalized(DraftId, VersionId),
    /// Data referenced by a pending write was removed by a concurrent `gc`.
    #[error("a concurrent gc removed {0} that this write referenced; run the command again")]
    ConcurrentGc(String),
    /// A chunk `fsck --repair` took out of service: its stored copy is
    /// damaged and no intact copy has been stored since.
    #[error("chunk {chunk}{} is damaged ({reason}); sync an intact copy of the file again to heal it (`dsv fsck` lists the files)", file.map(|f| format!(" of file {f}")).unwrap_or_default())]
    DamagedChunk {
        /// The chunk.
        chunk: ChunkId,
        /// The file object being read, when known.
        file: Option<ObjectId>,
        /// What `fsck` found wrong with it.
        reason: String,
    },
    /// An object that decoded as another type.
    #[error("object {id} is a {found}, expected a {expected}")]
    WrongObjectType {
        /// The object.
        id: ObjectId,
        /// Its type.
        found: &'static str,
        /// The wanted type.
        expected: &'static str,
    },
    /// A transaction kept conflicting with concurrent writers (what it read
    /// changed before it could commit) and gave up after `tries` attempts.
    /// Retryable.
    #[error("transaction conflict on {what} after {tries} attempts; run the command again")]
    Conflict {
        /// The first read that no longer held.
        what: String,
        /// Attempts made.
        tries: u32,
    },
    /// The metadata backend cannot be reached or written now (a server
    /// down, a connection lost). Retryable.
    #[error("metadata store unavailable: {0}")]
    Unavailable(String),
    /// Pack storage (object storage, a remote) refused or failed a
    /// request: `what` names the object or bucket, `reason` says why.
    #[error("{what}: {reason}")]
    Storage {
        /// The object, bucket or URL.
        what: String,
        /// Why (denied, missing bucket, unreachable endpoint …).
        reason: String,
    },
    /// An injected failure (crash tests).
    #[error("injected failure at {0}")]
    Injected(&'static str),
}

impl Error {
    /// Wraps an I/O error with the operation and path.
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            op,
            path: path.into(),
            source,
        }
    }

    /// Wraps an I/O error on the user's input.
    pub fn input(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Input {
            op,
            path: path.into(),
            source,
        }
    }

    /// A decode failure.
    pub fn corrupted(what: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Corrupted {
            what: what.into(),
            reason: reason.into(),
        }
    }

    /// A not-found error.
    pub fn not_found(kind: Kind, what: impl Into<String>) -> Self {
        Error::NotFound {
            kind,
            what: what.into(),
        }
    }

    /// Whether this error means the repository itself is damaged or
    /// unavailable (exit code 2), rather than a user mistake (exit code 1).
    pub fn is_repository_problem(&self) -> bool {
        matches!(
            self,
            Error::Io { .. }
                | Error::Random(_)
                | Error::Kv(_)
                | Error::Corrupted { .. }
                | Error::ChecksumMismatch { .. }
                | Error::DamagedChunk { .. }
                | Error::UnsupportedFormatVersion { .. }
                | Error::NeedsUpgrade { .. }
                | Error::UnknownFeatures { .. }
                | Error::ReadOnlyFeatures { .. }
                | Error::LockTimeout { .. }
                | Error::ConcurrentGc(_)
                | Error::Conflict { .. }
                | Error::Unavailable(_)
                | Error::Storage { .. }
                | Error::Injected(_)
        )
    }

    /// Whether running the same operation again may succeed: a conflict
    /// with concurrent writers, an unavailable backend, a lock held past
    /// its timeout, a concurrent gc.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Error::Conflict { .. }
                | Error::Unavailable(_)
                | Error::LockTimeout { .. }
                | Error::ConcurrentGc(_)
        )
    }
}
