//! The pack-storage seam on object storage (S3 and S3-compatible servers,
//! GCS, Azure, memory) through the `object_store` crate.
//!
//! The requests run on this storage's own tokio runtime (two I/O threads),
//! never on the caller's compute pool (so its blocking calls must not be
//! made from inside another tokio runtime's task; use `spawn_blocking`): a batch call hands its requests to
//! the runtime and waits for them; uploads overlap with the caller
//! producing the next pack. Transient failures (connection resets,
//! timeouts, 5xx, throttling) are retried by the client with exponential
//! backoff; what is left is reported as [`Error::Unavailable`] (retryable)
//! or [`Error::Storage`] naming the object and the reason.

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt, TryStreamExt};
use object_store::path::Path as OsPath;
use object_store::{
    GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutMode as OsPutMode, PutOptions,
    PutPayload, UpdateVersion, WriteMultipart,
};

use dsv_store::storage::{Got, Listed, OnBytes, PackStorage, PutMode, PutOutcome};
use dsv_store::{Error, Result};

/// Uploads and downloads in flight at once.
pub const CONCURRENCY: usize = 8;
/// Objects larger than this are uploaded in parts.
pub const MULTIPART_ABOVE: usize = 64 << 20;
/// Part size of multipart uploads.
pub const PART_SIZE: usize = 8 << 20;
/// Ranges closer than this are read with one request.
pub const COALESCE_GAP: u64 = 256 << 10;

/// Object storage behind the seam.
pub struct ObjectStorage {
    store: Arc<dyn ObjectStore>,
    prefix: OsPath,
    location: String,
    rt: tokio::runtime::Runtime,
}

impl std::fmt::Debug for ObjectStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectStorage")
            .field("location", &self.location)
            .finish()
    }
}

/// Maps an `object_store` error to the store's, naming `what`.
pub fn map_err(what: &str, e: object_store::Error) -> Error {
    use object_store::Error as E;
    match e {
        E::NotFound { .. } => Error::Storage {
            what: what.to_string(),
            reason: "not found".into(),
        },
        E::PermissionDenied { source, .. } => {
            let msg = chain(&*source).to_ascii_lowercase();
            let why = if msg.contains("invalidaccesskeyid") {
                "the credentials were refused: the storage knows no such access key id"
            } else if msg.contains("signaturedoesnotmatch") {
                "the credentials were refused: the secret key does not match the access key id"
            } else {
                "access denied: the credentials lack permission for this bucket or prefix"
            };
            Error::Storage {
                what: what.to_string(),
                reason: format!("{why} ({})", short(&*source)),
            }
        }
        E::Unauthenticated { source, .. } => Error::Storage {
            what: what.to_string(),
            reason: format!("the credentials were refused: {}", short(&*source)),
        },
        E::Generic { source, .. } => {
            let msg = chain(&*source);
            let low = msg.to_ascii_lowercase();
            if low.contains("nosuchbucket") || low.contains("bucket does not exist") {
                Error::Storage {
                    what: what.to_string(),
                    reason: "the bucket does not exist".into(),
                }
            } else if low.contains("invalidaccesskeyid") || low.contains("signaturedoesnotmatch") {
                Error::Storage {
                    what: what.to_string(),
                    reason: format!("the credentials were refused: {}", clip(&msg)),
                }
            } else if low.contains("accessdenied")
                || low.contains("forbidden")
                || low.contains("403")
            {
                Error::Storage {
                    what: what.to_string(),
                    reason: format!("access denied (check the credentials): {}", clip(&msg)),
                }
            } else if low.contains("error sending request")
                || low.contains("connection")
                || low.contains("timed out")
                || low.contains("retry")
                || low.contains("dns")
                || low.contains("body")
                || low.contains("reset")
                || low.contains("broken pipe")
                || low.contains("eof")
                || low.contains("incomplete")
            {
                Error::Unavailable(format!("{what}: {}", clip(&msg)))
            } else {
                Error::Storage {
                    what: what.to_string(),
                    reason: clip(&msg),
                }
            }
        }
        other => Error::Storage {
            what: what.to_string(),
            reason: clip(&other.to_string()),
        },
    }
}

fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

fn short(e: &(dyn std::error::Error + Send + Sync + 'static)) -> String {
    clip(&chain(e))
}

fn clip(s: &str) -> String {
    let s = s.replace('\n', " ");
    if s.len() > 400 {
        let mut end = 400;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}…", &s[..end])
    } else {
        s
    }
}

/// Attempts of one request whose failure looks transient (on top of the
/// client's own retries, which do not cover a response that broke off).
const ATTEMPTS: u32 = 4;

/// Runs `f` again (after 100, 200, 400 ms) while it fails with an error
/// that may pass ([`Error::Unavailable`]).
pub async fn retrying<T, F, Fut>(mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut attempt = 0;
    loop {
        match f().await {
            Err(Error::Unavailable(why)) if attempt + 1 < ATTEMPTS => {
                tracing::debug!("transient storage failure, retrying: {why}");
                tokio::time::sleep(std::time::Duration::from_millis(100 << attempt)).await;
                attempt += 1;
            }
            r => return r,
        }
    }
}

/// The opaque entity tag callers keep: the object's ETag, and its version
/// where the store has one (GCS generations), joined by a newline.
fn token(e_tag: Option<String>, version: Option<String>) -> Option<String> {
    match (e_tag, version) {
        (e, None) => e,
        (e, Some(v)) => Some(format!("{}\n{v}", e.unwrap_or_default())),
    }
}

fn untoken(t: String) -> UpdateVersion {
    match t.split_once('\n') {
        Some((e, v)) => UpdateVersion {
            e_tag: (!e.is_empty()).then(|| e.to_string()),
            version: Some(v.to_string()),
        },
        None => UpdateVersion {
            e_tag: Some(t),
            version: None,
        },
    }
}

/// Merges sorted ranges of one object that are closer than `gap`.
pub fn coalesce(ranges: &[Range<u64>], gap: u64) -> Vec<Range<u64>> {
    let mut sorted: Vec<Range<u64>> = ranges.to_vec();
    sorted.sort_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::new();
    for r in sorted {
        match out.last_mut() {
            Some(last) if r.start <= last.end.saturating_add(gap) => {
                last.end = last.end.max(r.end);
            }
            _ => out.push(r),
        }
    }
    out
}

impl ObjectStorage {
    /// Wraps a store; `prefix` is the remote's folder in it, `location` its
    /// URL for messages.
    pub fn new(store: Arc<dyn ObjectStore>, prefix: OsPath, location: String) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("dsv-io")
            .enable_all()
            .build()
            .map_err(|e| Error::io("start the I/O runtime", "", e))?;
        Ok(Self {
            store,
            prefix,
            location,
            rt,
        })
    }

    fn path(&self, name: &str) -> Result<OsPath> {
        dsv_store::storage::check_name(name)?;
        let mut p = self.prefix.clone();
        for part in name.split('/') {
            p = p.join(part);
        }
        Ok(p)
    }

    fn what(&self, name: &str) -> String {
        format!("{}/{name}", self.location.trim_end_matches('/'))
    }

    async fn upload(
        store: Arc<dyn ObjectStore>,
        path: OsPath,
        data: Vec<u8>,
        what: String,
    ) -> Result<u64> {
        let len = data.len() as u64;
        if data.len() > MULTIPART_ABOVE {
            // Names are content hashes: an object already there is this one.
            match store.head(&path).await {
                Ok(_) => return Ok(len),
                Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(map_err(&what, e)),
            }
            let up = store
                .put_multipart(&path)
                .await
                .map_err(|e| map_err(&what, e))?;
            let mut w = WriteMultipart::new_with_chunk_size(up, PART_SIZE);
            let data = Bytes::from(data);
            let mut at = 0;
            while at < data.len() {
                w.wait_for_capacity(4)
                    .await
                    .map_err(|e| map_err(&what, e))?;
                let end = (at + PART_SIZE).min(data.len());
                w.put(data.slice(at..end));
                at = end;
            }
            w.finish().await.map_err(|e| map_err(&what, e))?;
            return Ok(len);
        }
        let opts = PutOptions {
            mode: OsPutMode::Create,
            ..Default::default()
        };
        let payload = PutPayload::from(Bytes::from(data));
        retrying(|| async {
            match store.put_opts(&path, payload.clone(), opts.clone()).await {
                Ok(_) => Ok(len),
                // Names are content hashes: an object already there is this one.
                Err(object_store::Error::AlreadyExists { .. })
                | Err(object_store::Error::Precondition { .. }) => Ok(len),
                Err(e) => Err(map_err(&what, e)),
            }
        })
        .await
    }
}

impl PackStorage for ObjectStorage {
    fn location(&self) -> String {
        self.location.clone()
    }

    fn put(&self, name: &str, data: Vec<u8>, mode: PutMode) -> Result<PutOutcome> {
        let path = self.path(name)?;
        let what = self.what(name);
        let mode = match mode {
            PutMode::Create => OsPutMode::Create,
            PutMode::Overwrite => OsPutMode::Overwrite,
            PutMode::Update(etag) => OsPutMode::Update(untoken(etag)),
        };
        let store = self.store.clone();
        let is_update = matches!(mode, OsPutMode::Update(_));
        self.rt.block_on(async move {
            let opts = PutOptions {
                mode,
                ..Default::default()
            };
            match store.put_opts(&path, PutPayload::from(data), opts).await {
                Ok(r) => Ok(PutOutcome::Written(token(r.e_tag, r.version))),
                Err(object_store::Error::AlreadyExists { .. }) => Ok(PutOutcome::Exists),
                Err(object_store::Error::Precondition { .. }) => Ok(PutOutcome::Changed),
                // An update of an object that is gone.
                Err(object_store::Error::NotFound { .. }) if is_update => Ok(PutOutcome::Changed),
                Err(object_store::Error::NotFound { .. }) => Err(Error::Storage {
                    what,
                    reason: "the bucket does not exist".into(),
                }),
                Err(e) => Err(map_err(&what, e)),
            }
        })
    }

    fn put_many(
        &self,
        items: &mut dyn Iterator<Item = Result<(String, Vec<u8>)>>,
        on_bytes: OnBytes<'_>,
    ) -> Result<u64> {
        let mut in_flight = FuturesUnordered::new();
        let mut total = 0u64;
        let mut first_err: Option<Error> = None;
        let mut items = items.peekable();
        loop {
            // Start uploads up to the limit; producing the next item (the
            // caller building a pack) overlaps with the uploads running on
            // the I/O threads.
            while in_flight.len() < CONCURRENCY && first_err.is_none() {
                match items.next() {
                    Some(Ok((name, data))) => {
                        let path = self.path(&name)?;
                        let what = self.what(&name);
                        let store = self.store.clone();
                        in_flight.push(self.rt.spawn(Self::upload(store, path, data, what)));
                    }
                    Some(Err(e)) => first_err = Some(e),
                    None => break,
                }
            }
            if in_flight.is_empty() {
                break;
            }
            let done = self.rt.block_on(in_flight.next());
            match done {
                Some(Ok(Ok(n))) => {
                    total += n;
                    on_bytes(n);
                }
                Some(Ok(Err(e))) => {
                    first_err.get_or_insert(e);
                }
                Some(Err(join)) => {
                    first_err.get_or_insert(Error::Storage {
                        what: self.location.clone(),
                        reason: format!("upload task failed: {join}"),
                    });
                }
                None => break,
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(total),
        }
    }

    fn get(&self, name: &str) -> Result<Option<Got>> {
        let path = self.path(name)?;
        let what = self.what(name);
        let store = self.store.clone();
        self.rt.block_on(retrying(|| async {
            match store.get_opts(&path, GetOptions::default()).await {
                Ok(r) => {
                    let etag = token(r.meta.e_tag.clone(), r.meta.version.clone());
                    let data = r.bytes().await.map_err(|e| map_err(&what, e))?;
                    Ok(Some(Got {
                        data: data.to_vec(),
                        etag,
                    }))
                }
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(map_err(&what, e)),
            }
        }))
    }

    fn get_ranges(
        &self,
        reqs: &[(String, Range<u64>)],
        on_bytes: OnBytes<'_>,
    ) -> Result<Vec<Vec<u8>>> {
        // Group by object, coalesce near ranges, fetch the merged ranges
        // concurrently, then cut the answers back out in request order.
        let mut by_obj: std::collections::BTreeMap<&str, Vec<Range<u64>>> = Default::default();
        for (name, r) in reqs {
            by_obj.entry(name.as_str()).or_default().push(r.clone());
        }
        let mut jobs = Vec::new();
        for (name, ranges) in &by_obj {
            for m in coalesce(ranges, COALESCE_GAP) {
                jobs.push((name.to_string(), m));
            }
        }
        let mut fetched: std::collections::HashMap<(String, u64), Bytes> = Default::default();
        let store = self.store.clone();
        let mut futs = futures::stream::iter(jobs.into_iter().map(|(name, r)| {
            let store = store.clone();
            let path = self.path(&name);
            let what = self.what(&name);
            async move {
                let path = path?;
                let bytes = retrying(|| async {
                    let opts = GetOptions {
                        range: Some(GetRange::Bounded(r.clone())),
                        ..Default::default()
                    };
                    let got = store
                        .get_opts(&path, opts)
                        .await
                        .map_err(|e| map_err(&what, e))?;
                    got.bytes().await.map_err(|e| map_err(&what, e))
                })
                .await?;
                if bytes.len() as u64 != r.end - r.start {
                    return Err(Error::corrupted(
                        what,
                        format!(
                            "bytes {}..{} asked, {} returned (truncated object)",
                            r.start,
                            r.end,
                            bytes.len()
                        ),
                    ));
                }
                Ok::<_, Error>((name, r.start, bytes))
            }
        }))
        .buffer_unordered(CONCURRENCY);
        self.rt.block_on(async {
            while let Some(r) = futs.next().await {
                let (name, start, bytes) = r?;
                on_bytes(bytes.len() as u64);
                fetched.insert((name, start), bytes);
            }
            Ok::<_, Error>(())
        })?;
        drop(futs);
        // Cut each request out of the merged range that holds it.
        let mut merged: std::collections::BTreeMap<&str, Vec<(u64, &Bytes)>> = Default::default();
        for ((name, start), b) in &fetched {
            merged.entry(name.as_str()).or_default().push((*start, b));
        }
        for v in merged.values_mut() {
            v.sort_by_key(|(s, _)| *s);
        }
        let mut out = Vec::with_capacity(reqs.len());
        for (name, r) in reqs {
            let list = &merged[name.as_str()];
            let idx = list.partition_point(|(s, _)| *s <= r.start) - 1;
            let (s, b) = list[idx];
            let from = (r.start - s) as usize;
            let to = (r.end - s) as usize;
            out.push(b[from..to].to_vec());
        }
        Ok(out)
    }

    fn size(&self, name: &str) -> Result<Option<u64>> {
        let path = self.path(name)?;
        let what = self.what(name);
        let store = self.store.clone();
        self.rt.block_on(async move {
            match store.head(&path).await {
                Ok(m) => Ok(Some(m.size)),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(map_err(&what, e)),
            }
        })
    }

    fn list(&self, prefix: &str) -> Result<Vec<Listed>> {
        let store = self.store.clone();
        let base = self.prefix.clone();
        let what = self.what(prefix);
        // List under the folder part of the prefix, filter by the rest.
        let folder = match prefix.rfind('/') {
            Some(i) => &prefix[..i],
            None => "",
        };
        let mut list_at = base.clone();
        for part in folder.split('/').filter(|p| !p.is_empty()) {
            list_at = list_at.join(part);
        }
        let base_s = base.to_string();
        let mut out: Vec<Listed> = self.rt.block_on(async move {
            store
                .list(Some(&list_at))
                .map_err(|e| match e {
                    // Listing a prefix never finds "no object": the bucket is missing.
                    object_store::Error::NotFound { .. } => Error::Storage {
                        what: what.clone(),
                        reason: "the bucket does not exist".into(),
                    },
                    e => map_err(&what, e),
                })
                .try_filter_map(|m| {
                    let full = m.location.to_string();
                    let rel = if base_s.is_empty() {
                        full.clone()
                    } else {
                        full.strip_prefix(&format!("{base_s}/"))
                            .unwrap_or(&full)
                            .to_string()
                    };
                    let keep = rel.starts_with(prefix);
                    async move {
                        Ok(keep.then_some(Listed {
                            name: rel,
                            size: m.size,
                            modified_ms: m.last_modified.timestamp_millis(),
                        }))
                    }
                })
                .try_collect()
                .await
        })?;
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn check(&self) -> Result<()> {
        let store = self.store.clone();
        let prefix = self.prefix.clone();
        let what = self.location.clone();
        self.rt.block_on(retrying(|| async {
            match store.list_with_delimiter(Some(&prefix)).await {
                Ok(_) => Ok(()),
                Err(object_store::Error::NotFound { .. }) => Err(Error::Storage {
                    what: what.clone(),
                    reason: "the bucket does not exist".into(),
                }),
                Err(e) => Err(map_err(&what, e)),
            }
        }))
    }

    fn delete(&self, name: &str) -> Result<()> {
        let path = self.path(name)?;
        let what = self.what(name);
        let store = self.store.clone();
        self.rt.block_on(async move {
            match store.delete(&path).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(map_err(&what, e)),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coalesces_near_ranges_only() {
        assert_eq!(
            coalesce(&[0..10, 12..20, 100..110], 5),
            vec![0..20, 100..110]
        );
        assert_eq!(coalesce(&[50..60, 0..10], 0), vec![0..10, 50..60]);
    }

    #[test]
    fn memory_store_behaves_like_the_seam() {
        let s = ObjectStorage::new(
            Arc::new(object_store::memory::InMemory::new()),
            OsPath::from("pre"),
            "memory:///pre".into(),
        )
        .unwrap();
        let PutOutcome::Written(Some(etag)) = s
            .put("refs/x.json", b"a".to_vec(), PutMode::Create)
            .unwrap()
        else {
            panic!("no etag")
        };
        assert_eq!(
            s.put("refs/x.json", b"b".to_vec(), PutMode::Create)
                .unwrap(),
            PutOutcome::Exists
        );
        assert_eq!(
            s.put("refs/x.json", b"c".to_vec(), PutMode::Update("zz".into()))
                .unwrap(),
            PutOutcome::Changed
        );
        assert!(matches!(
            s.put("refs/x.json", b"d".to_vec(), PutMode::Update(etag))
                .unwrap(),
            PutOutcome::Written(_)
        ));
        let mut items = (0..20).map(|i| Ok((format!("packs/{i:02}.pack"), vec![i as u8; 100 + i])));
        let n = s.put_many(&mut items, &|_| {}).unwrap();
        assert_eq!(n, (0..20).map(|i| 100 + i as u64).sum::<u64>());
        let l = s.list("packs/").unwrap();
        assert_eq!(l.len(), 20);
        assert_eq!(l[3].name, "packs/03.pack");
        let got = s
            .get_ranges(
                &[
                    ("packs/05.pack".into(), 2..4),
                    ("packs/01.pack".into(), 0..3),
                    ("packs/05.pack".into(), 0..1),
                ],
                &|_| {},
            )
            .unwrap();
        assert_eq!(got, vec![vec![5, 5], vec![1, 1, 1], vec![5]]);
        assert!(s
            .get_ranges(&[("packs/missing".into(), 0..1)], &|_| {})
            .is_err());
        assert_eq!(s.get("refs/x.json").unwrap().unwrap().data, b"d");
        assert_eq!(s.list("refs/").unwrap().len(), 1);
        // An object above the multipart threshold goes up in parts and
        // reads back whole; a second upload of the name is skipped.
        let big: Vec<u8> = (0..MULTIPART_ABOVE + 3 * PART_SIZE / 2)
            .map(|i| (i % 251) as u8)
            .collect();
        for _ in 0..2 {
            let mut one = std::iter::once(Ok(("packs/big.pack".to_string(), big.clone())));
            assert_eq!(s.put_many(&mut one, &|_| {}).unwrap(), big.len() as u64);
        }
        assert_eq!(s.get("packs/big.pack").unwrap().unwrap().data, big);
    }
}
