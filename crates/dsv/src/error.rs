//! The porcelain's error type: store errors plus dataset-level ones, each
//! naming the dataset, version, tag or path at fault.

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Every failure of a porcelain operation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The engine failed.
    #[error(transparent)]
    Store(#[from] dsv_store::Error),
    /// No dataset with that project and name.
    #[error("dataset not found: {0}")]
    DatasetNotFound(String),
    /// A revision that names nothing.
    #[error("{0}")]
    RevisionNotFound(String),
    /// A revision string that does not parse.
    #[error("invalid revision '{spec}': {reason}")]
    InvalidRevision {
        /// What was given.
        spec: String,
        /// Why it is wrong.
        reason: String,
    },
    /// Bad input (a name, a pattern, an option).
    #[error("{0}")]
    Invalid(String),
    /// The version string is taken in that dataset.
    #[error("dataset {dataset} already has version {version}")]
    VersionExists {
        /// `project/name`.
        dataset: String,
        /// The version string.
        version: String,
    },
    /// A version that others depend on.
    #[error("version {id} is a parent of {children:?}; delete those first or pass --force")]
    DependedOn {
        /// The version.
        id: String,
        /// Short ids of its dependents.
        children: Vec<String>,
    },
    /// A version that tasks or models reference.
    #[error(
        "{version} is referenced by {}; deleting it would break their lineage \
         (with --force it leaves its dataset but its data is kept for them)",
        by.join(", ")
    )]
    Referenced {
        /// The version.
        version: String,
        /// What references it (tasks, models).
        by: Vec<String>,
    },
    /// Something that is not an open draft where one is needed (a dataset
    /// name, a version, a finalized draft); says what it is and how to get
    /// a draft.
    #[error("{0}")]
    NotADraft(String),
    /// A draft that belongs to no dataset (made by plumbing).
    #[error("draft {0} is not a dataset draft")]
    NotADatasetDraft(String),
    /// Someone else changed what this operation read; nothing was written.
    #[error("{0}; nothing was written, run the command again")]
    Conflict(String),
    /// A file or folder outside the store could not be read or written.
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        /// What was being done.
        action: String,
        /// The file or folder at fault.
        path: std::path::PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The cache's byte budget cannot hold what was asked for.
    #[error("{0}")]
    CacheBudget(String),
    /// A porcelain record that does not decode.
    #[error("corrupted {what}: {reason}")]
    Corrupted {
        /// The record.
        what: String,
        /// Why.
        reason: String,
    },
}

impl Error {
    /// Whether this is a repository problem (exit 2) rather than a user
    /// error (exit 1).
    pub fn is_repository_problem(&self) -> bool {
        match self {
            Error::Store(e) => e.is_repository_problem(),
            Error::Corrupted { .. } => true,
            _ => false,
        }
    }

    pub(crate) fn corrupted(what: impl Into<String>, reason: impl std::fmt::Display) -> Self {
        Error::Corrupted {
            what: what.into(),
            reason: reason.to_string(),
        }
    }
}

/// Carries porcelain errors out of engine closures (which return the
/// engine's error type): the real error is parked here and a placeholder
/// aborts the write.
#[derive(Default)]
pub(crate) struct Parked(Option<Error>);

impl Parked {
    /// Converts a porcelain error for the engine, keeping the original.
    pub(crate) fn park(&mut self, e: Error) -> dsv_store::Error {
        match e {
            Error::Store(s) => s,
            other => {
                self.0 = Some(other);
                dsv_store::Error::Invalid("aborted by the porcelain".into())
            }
        }
    }
    /// Forgets the error of an earlier run of the closure: a transaction
    /// body may run again after a conflict, and only its last run's error
    /// is the answer.
    pub(crate) fn reset(&mut self) {
        self.0 = None;
    }
    /// The error to report for an engine error.
    pub(crate) fn unpark(&mut self, e: dsv_store::Error) -> Error {
        self.0.take().unwrap_or(Error::Store(e))
    }
}
