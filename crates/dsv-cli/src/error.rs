//! Errors as the user sees them: one line naming what is at fault, an
//! optional hint, and an exit code.

use dsv_store::Error as StoreError;

/// A failed command.
#[derive(Debug)]
pub struct CliError {
    /// 1 = user error, 2 = repository problem.
    pub code: i32,
    /// The one-line message.
    pub message: String,
    /// What to do about it.
    pub hint: Option<String>,
}

impl CliError {
    /// A user error (exit 1).
    pub fn user(message: impl Into<String>) -> Self {
        Self {
            code: 1,
            message: message.into(),
            hint: None,
        }
    }
    /// A repository problem (exit 2).
    pub fn repo(message: impl Into<String>) -> Self {
        Self {
            code: 2,
            message: message.into(),
            hint: None,
        }
    }
    /// Adds a hint.
    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }
    /// Prints to stderr and returns the exit code. A closed stdout is not an error.
    pub fn report(&self) -> i32 {
        if self.message.contains("Broken pipe") {
            return 0;
        }
        match &self.hint {
            Some(h) => eprintln!("error: {}\nhint: {h}", self.message),
            None => eprintln!("error: {}", self.message),
        }
        self.code
    }
}

/// When `e` is ENOTCONN ("Transport endpoint is not connected"), the FUSE
/// mount it came from is stale (its process died): the hint names the
/// mount point, the highest folder of `path` that fails that way.
pub fn stale_mount_hint(path: &std::path::Path, e: &std::io::Error) -> Option<String> {
    if e.raw_os_error() != Some(libc::ENOTCONN) {
        return None;
    }
    let stale = |p: &std::path::Path| {
        std::fs::symlink_metadata(p)
            .err()
            .is_some_and(|e| e.raw_os_error() == Some(libc::ENOTCONN))
    };
    let mountpoint = path
        .ancestors()
        .filter(|a| !a.as_os_str().is_empty() && stale(a))
        .last()
        .unwrap_or(path);
    Some(format!(
        "{} is a stale FUSE mount (the process serving it ended); unmount it with 'fusermount3 -u {}'",
        mountpoint.display(),
        mountpoint.display()
    ))
}

impl From<StoreError> for CliError {
    fn from(e: StoreError) -> Self {
        let stale = match &e {
            StoreError::Io { path, source, .. } | StoreError::Input { path, source, .. } => {
                stale_mount_hint(path, source)
            }
            _ => None,
        };
        let hint = match &e {
            _ if stale.is_some() => stale,
            StoreError::LockTimeout { .. } => {
                Some("wait for it to finish, or raise --lock-timeout".to_string())
            }
            StoreError::NotARepository(_) => Some("run 'dsv init' or pass --repo PATH".to_string()),
            StoreError::ChecksumMismatch { .. } | StoreError::Corrupted { .. } => {
                Some("run 'dsv fsck --read-data' to list every damaged object".to_string())
            }
            StoreError::Ambiguous { .. } => Some("give more digits of the id".to_string()),
            _ => None,
        };
        let code = if e.is_repository_problem() { 2 } else { 1 };
        CliError {
            code,
            message: e.to_string(),
            hint,
        }
    }
}

impl From<std::io::Error> for CliError {
    fn from(e: std::io::Error) -> Self {
        CliError::repo(e.to_string())
    }
}

impl From<dsv::Error> for CliError {
    fn from(e: dsv::Error) -> Self {
        match e {
            dsv::Error::Store(s) => s.into(),
            other => {
                let hint = match &other {
                    dsv::Error::Io { path, source, .. } if stale_mount_hint(path, source).is_some() => {
                        stale_mount_hint(path, source)
                    }
                    dsv::Error::DatasetNotFound(_) => {
                        Some("'dsv dataset list' shows the datasets".to_string())
                    }
                    dsv::Error::InvalidRevision { .. } => Some(
                        "use PROJECT/NAME, PROJECT/NAME@VERSION, PROJECT/NAME@TAG or an id prefix (6+ hex digits)"
                            .to_string(),
                    ),
                    dsv::Error::RevisionNotFound(_) => {
                        Some("'dsv dataset list PROJECT/NAME' shows its versions and tags".to_string())
                    }
                    _ => None,
                };
                CliError {
                    code: if other.is_repository_problem() { 2 } else { 1 },
                    message: other.to_string(),
                    hint,
                }
            }
        }
    }
}

impl From<dsv_runtime::Error> for CliError {
    fn from(e: dsv_runtime::Error) -> Self {
        match e {
            dsv_runtime::Error::Repo(e) => e.into(),
            other => CliError {
                code: if other.is_repository_problem() { 2 } else { 1 },
                message: other.to_string(),
                hint: None,
            },
        }
    }
}
