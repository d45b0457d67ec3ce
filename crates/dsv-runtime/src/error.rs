//! The runtime's errors.

use std::path::PathBuf;

/// A runtime failure.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The repository refused or failed an operation.
    #[error(transparent)]
    Repo(#[from] dsv::Error),
    /// The operating system's change notifications could not be set up on
    /// `path` (inotify limits, a vanished folder).
    #[error("cannot watch {}: {message}", path.display())]
    Watch {
        /// What was to be watched.
        path: PathBuf,
        /// The notifier's error.
        message: String,
    },
    /// The folder given to [`crate::Watcher`] cannot be watched.
    #[error("cannot watch {}: {source}", path.display())]
    Folder {
        /// The folder as given.
        path: PathBuf,
        /// Why it cannot be opened.
        source: std::io::Error,
    },
    /// The path given to [`crate::Watcher`] is not a folder.
    #[error("{} is not a folder", path.display())]
    NotAFolder {
        /// The path, resolved.
        path: PathBuf,
    },
}

impl From<dsv_store::Error> for Error {
    fn from(e: dsv_store::Error) -> Self {
        Error::Repo(e.into())
    }
}

impl Error {
    /// Whether this is a problem of the repository or the machine (exit 2
    /// in the CLI) rather than of the caller's input.
    pub fn is_repository_problem(&self) -> bool {
        match self {
            Error::Repo(e) => e.is_repository_problem(),
            Error::Watch { .. } => true,
            Error::Folder { .. } | Error::NotAFolder { .. } => false,
        }
    }
}

/// The runtime's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
