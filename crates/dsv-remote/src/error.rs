//! Errors of remote operations, each naming the remote, dataset or object
//! at fault.

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What a remote operation reports.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A repository or storage failure.
    #[error(transparent)]
    Repo(#[from] dsv::Error),
    /// No remote of that name.
    #[error("no remote named '{0}'")]
    NoSuchRemote(String),
    /// `remote add` of a name in use.
    #[error("a remote named '{0}' exists already")]
    RemoteExists(String),
    /// A URL that does not name a remote.
    #[error("invalid remote URL '{url}': {reason}")]
    BadUrl {
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// A push the remote refused: it has versions this repository lacks.
    #[error("push of {dataset} to {remote} rejected: {reason}")]
    Rejected {
        /// The dataset.
        dataset: String,
        /// The remote.
        remote: String,
        /// Why.
        reason: String,
    },
    /// A remote written by a newer dsv.
    #[error("{location} was written by a newer dsv (remote format {found}{}; this dsv reads format {supported}); upgrade dsv", if features.is_empty() { String::new() } else { format!(", features {}", features.join(", ")) })]
    NewerFormat {
        /// The remote.
        location: String,
        /// Its format.
        found: u32,
        /// Features this build does not know.
        features: Vec<String>,
        /// What this build reads.
        supported: u32,
    },
    /// `clone` of a location that holds no dsv remote.
    #[error("{0} holds no dsv remote (no dsv-remote.json); push to it first")]
    EmptyRemote(String),
    /// `clone` into a folder that holds a repository.
    #[error("{0} already holds a dsv repository")]
    TargetExists(std::path::PathBuf),
    /// Another process holds a lease the operation cannot run beside.
    #[error("{location}: {reason}")]
    Busy {
        /// The remote.
        location: String,
        /// Who holds it and what to do.
        reason: String,
    },
    /// Something on the remote that is not what it must be.
    #[error("{location}: {reason}")]
    BadRemote {
        /// The remote object.
        location: String,
        /// What is wrong.
        reason: String,
    },
}

impl From<dsv_store::Error> for Error {
    fn from(e: dsv_store::Error) -> Self {
        Error::Repo(dsv::Error::Store(e))
    }
}

impl Error {
    /// Whether the repository, the remote or the network is at fault (exit
    /// code 2) rather than the user's input (exit code 1).
    pub fn is_repository_problem(&self) -> bool {
        match self {
            Error::Repo(e) => e.is_repository_problem(),
            Error::BadRemote { .. } | Error::NewerFormat { .. } => true,
            _ => false,
        }
    }

    /// Whether running the command again may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Repo(dsv::Error::Store(e)) => e.is_retryable(),
            Error::Busy { .. } => true,
            _ => false,
        }
    }
}
