//! Opening a remote's storage from its URL.

use std::sync::Arc;

use dsv_store::storage::{LocalDir, PackStorage};

use crate::error::{Error, Result};
use crate::keys::RemoteRecord;
use crate::objstore::ObjectStorage;

/// Credentials and client options for object storage, gathered by the
/// caller (the CLI reads them from the environment and the profile files:
/// `AWS_*`, `GOOGLE_*`, `AZURE_*`, `~/.aws/credentials`). Keys are the
/// `object_store` crate's (`aws_access_key_id`, `aws_session_token`,
/// `google_service_account`, `azure_storage_account_name`, …). Never
/// written into the repository, never printed.
#[derive(Clone, Default)]
pub struct Connect {
    /// Key/value options.
    pub options: Vec<(String, String)>,
}

impl std::fmt::Debug for Connect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Names only: values may be secrets.
        let keys: Vec<&str> = self.options.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("Connect").field("options", &keys).finish()
    }
}

/// What a remote URL names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A local folder.
    Folder(std::path::PathBuf),
    /// Object storage (`s3://`, `gs://`, `az://`, …).
    Objects(url::Url),
}

/// Parses a remote URL: `s3://bucket/prefix`, `gs://bucket/prefix`,
/// `az://container/prefix` (also `abfs://`, `azure://`), `file:///path`,
/// or an absolute path.
pub fn parse_url(s: &str) -> Result<Target> {
    let bad = |reason: &str| Error::BadUrl {
        url: s.to_string(),
        reason: reason.to_string(),
    };
    if s.starts_with('/') {
        return Ok(Target::Folder(s.into()));
    }
    let u = url::Url::parse(s).map_err(|e| {
        bad(&format!(
            "{e}; use s3://BUCKET/PREFIX, gs://BUCKET/PREFIX, az://CONTAINER/PREFIX, file:///PATH or an absolute path"
        ))
    })?;
    match u.scheme() {
        "file" => {
            let p = u.to_file_path().map_err(|_| bad("not a local path"))?;
            Ok(Target::Folder(p))
        }
        "s3" | "s3a" | "gs" | "az" | "abfs" | "abfss" | "azure" | "adl" => {
            if u.host_str().map(str::is_empty).unwrap_or(true) {
                return Err(bad("no bucket or container after the scheme"));
            }
            Ok(Target::Objects(u))
        }
        other => Err(bad(&format!(
            "unknown scheme '{other}'; use s3://, gs://, az://, file:// or an absolute path"
        ))),
    }
}

/// Opens the storage a remote record names.
pub fn open_storage(rec: &RemoteRecord, connect: &Connect) -> Result<Arc<dyn PackStorage>> {
    match parse_url(&rec.url)? {
        Target::Folder(p) => Ok(Arc::new(LocalDir::new(p))),
        Target::Objects(u) => {
            let is_s3 = matches!(u.scheme(), "s3" | "s3a");
            // Packs are content-addressed and checked on every read, so the
            // request signature need not hash each body again (the
            // environment may say otherwise: its options come after).
            let mut opts: Vec<(String, String)> = Vec::new();
            if is_s3 {
                opts.push(("aws_unsigned_payload".into(), "true".into()));
            }
            opts.extend(connect.options.iter().cloned());
            if let Some(ep) = &rec.endpoint {
                if !is_s3 {
                    return Err(Error::BadUrl {
                        url: rec.url.clone(),
                        reason: "--endpoint is for S3-compatible servers (s3:// URLs)".into(),
                    });
                }
                url::Url::parse(ep).map_err(|e| Error::BadUrl {
                    url: ep.clone(),
                    reason: format!("invalid endpoint: {e}"),
                })?;
                opts.retain(|(k, _)| k != "aws_endpoint" && k != "aws_endpoint_url");
                opts.push(("aws_endpoint".into(), ep.clone()));
                if ep.starts_with("http://") {
                    opts.push(("aws_allow_http".into(), "true".into()));
                }
            }
            if is_s3 {
                let region = rec.region.clone().or_else(|| {
                    opts.iter()
                        .find(|(k, _)| k == "aws_region" || k == "aws_default_region")
                        .map(|(_, v)| v.clone())
                });
                opts.retain(|(k, _)| k != "aws_region");
                opts.push((
                    "aws_region".into(),
                    region.unwrap_or_else(|| "us-east-1".into()),
                ));
            }
            let (store, prefix) = build_store(&u, &opts).map_err(|e| Error::BadUrl {
                url: rec.url.clone(),
                reason: e.to_string(),
            })?;
            let loc = rec.url.trim_end_matches('/').to_string();
            Ok(Arc::new(ObjectStorage::new(Arc::from(store), prefix, loc)?))
        }
    }
}

/// Retries of one request inside the client: transient failures
/// (connection refused or reset, timeouts, 5xx, throttling) are retried
/// with exponential backoff from 100 ms, at most 5 times within 30 s;
/// [`crate::objstore`] also retries a request whose response broke off.
pub fn retry_config() -> object_store::RetryConfig {
    object_store::RetryConfig {
        backoff: object_store::BackoffConfig {
            init_backoff: std::time::Duration::from_millis(100),
            max_backoff: std::time::Duration::from_secs(5),
            base: 2.0,
        },
        max_retries: 5,
        retry_timeout: std::time::Duration::from_secs(30),
    }
}

type Built = (Box<dyn object_store::ObjectStore>, object_store::path::Path);

fn build_store(u: &url::Url, opts: &[(String, String)]) -> object_store::Result<Built> {
    use object_store::ObjectStoreScheme as S;
    let (scheme, path) = S::parse(u)?;
    let path = object_store::path::Path::parse(path)?;
    macro_rules! build {
        ($builder:ty) => {{
            let mut b = <$builder>::new().with_url(u.as_str());
            for (k, v) in opts {
                if let Ok(key) = k.parse() {
                    b = b.with_config(key, v.clone());
                }
            }
            Box::new(b.with_retry(retry_config()).build()?) as Box<dyn object_store::ObjectStore>
        }};
    }
    let store = match scheme {
        S::AmazonS3 => build!(object_store::aws::AmazonS3Builder),
        S::GoogleCloudStorage => build!(object_store::gcp::GoogleCloudStorageBuilder),
        S::MicrosoftAzure => build!(object_store::azure::MicrosoftAzureBuilder),
        _ => return object_store::parse_url_opts(u, opts.iter().cloned()),
    };
    Ok((store, path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert!(matches!(parse_url("/tmp/x").unwrap(), Target::Folder(_)));
        assert!(matches!(
            parse_url("file:///tmp/x").unwrap(),
            Target::Folder(_)
        ));
        assert!(matches!(parse_url("s3://b/p").unwrap(), Target::Objects(_)));
        for bad in [
            "relative/path",
            "http://x/y",
            "s3:///nobucket",
            "ftp://h/p",
            "",
        ] {
            let e = parse_url(bad).unwrap_err().to_string();
            assert!(e.contains("invalid remote URL"), "{bad}: {e}");
        }
    }
}
