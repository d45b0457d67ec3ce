//! The trainer's errors; each names the parameter, file, row or column at fault.

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A training or prediction failure.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A missing or invalid parameter.
    #[error("{0}")]
    Params(String),
    /// Bad data: a missing column, a non-numeric cell, no rows, one class.
    #[error("{0}")]
    Data(String),
    /// The estimator failed.
    #[error("fitting failed: {0}")]
    Fit(String),
    /// The caller asked to stop (`train_until`'s `cancelled` returned true).
    #[error("training cancelled {0}")]
    Cancelled(String),
    /// The repository failed.
    #[error(transparent)]
    Repo(#[from] dsv::Error),
}
