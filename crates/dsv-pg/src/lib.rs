//! # dsv-pg
//!
//! The metadata seam ([`dsv_store::kv::Backend`]) on PostgreSQL, for a team
//! repository shared by several machines.
//!
//! - **Layout**: one table `dsv_kv (cf smallint, k bytea, v bytea, primary
//!   key (cf, k))`; `bytea` sorts bytewise, as RocksDB does, so prefix
//!   scans are index range scans in both directions (read in pages).
//!   `dsv_schema (version)` is checked at connect.
//! - **Transactions**: each runs `SERIALIZABLE` on a pooled connection; a
//!   serialization failure or deadlock (SQLSTATE 40001 / 40P01) is the
//!   seam's retryable [`Error::Conflict`]. The batch is applied as one
//!   upsert and one delete (the last op per key wins), with the keyspace
//!   counters sealed in the same transaction ([`dsv_store::txn::seal`]).
//! - **Snapshots**: a view is a `REPEATABLE READ READ ONLY` transaction on
//!   its own connection, ended when the view is dropped.
//! - **Change feed**: every commit `NOTIFY`s `dsv_changes` (delivered at
//!   commit); a change source holds a connection that `LISTEN`s and wakes
//!   its waiter.
//!
//! Synchronous facade: the async client runs on this crate's own small
//! tokio runtime, so callers (rayon workers, the CLI) never block an async
//! executor of theirs.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use dsv_store::kv::{Backend, Batch, Cf, KvRead, Op, TxnBody, Visitor, ALL_CFS};
use dsv_store::{Error, Result};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls};

/// The schema version this build writes and reads.
pub const SCHEMA_VERSION: i32 = 1;
/// Rows read per page of a scan.
const PAGE: i64 = 512;
/// The notification channel.
const CHANNEL: &str = "dsv_changes";

fn cf_code(cf: Cf) -> i16 {
    ALL_CFS.iter().position(|c| *c == cf).unwrap_or(0) as i16
}

fn prefix_successor(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut s = prefix.to_vec();
    while let Some(last) = s.pop() {
        if last < 0xff {
            s.push(last + 1);
            return Some(s);
        }
    }
    None
}

/// Maps a PostgreSQL error onto the seam's errors.
fn map_err(what: &str, e: tokio_postgres::Error) -> Error {
    use tokio_postgres::error::SqlState;
    if let Some(code) = e.code() {
        if *code == SqlState::T_R_SERIALIZATION_FAILURE || *code == SqlState::T_R_DEADLOCK_DETECTED
        {
            return Error::Conflict {
                what: format!("{what}: a concurrent transaction ({})", code.code()),
                tries: 1,
            };
        }
    }
    if e.is_closed() || e.as_db_error().is_none() {
        return Error::Unavailable(format!("PostgreSQL: {what}: {e}"));
    }
    Error::Kv(format!("PostgreSQL: {what}: {e}"))
}

struct Shared {
    rt: tokio::runtime::Runtime,
    url: String,
    idle: Mutex<Vec<Client>>,
}

impl Shared {
    fn connect(&self) -> Result<Client> {
        let url = self.url.clone();
        self.rt.block_on(async move {
            let (client, conn) = tokio_postgres::connect(&url, NoTls)
                .await
                .map_err(|e| map_err("connect", e))?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!("PostgreSQL connection ended: {e}");
                }
            });
            Ok::<_, Error>(client)
        })
    }

    fn checkout(&self) -> Result<Client> {
        loop {
            let c = self.idle.lock().map_err(|_| poisoned())?.pop();
            match c {
                Some(c) if !c.is_closed() => return Ok(c),
                Some(_) => continue,
                None => return self.connect(),
            }
        }
    }

    fn give_back(&self, c: Client) {
        if !c.is_closed() {
            if let Ok(mut idle) = self.idle.lock() {
                if idle.len() < 16 {
                    idle.push(c);
                }
            }
        }
    }
}

fn poisoned() -> Error {
    Error::Kv("PostgreSQL connection pool lock poisoned".into())
}

/// A PostgreSQL database holding one repository's metadata.
pub struct PgKv {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for PgKv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may hold a password: never printed.
        f.debug_struct("PgKv").finish_non_exhaustive()
    }
}

impl PgKv {
    /// Connects to `url` (`postgres://user@host:port/db`, or key=value
    /// pairs), creates the schema when the database has none, and checks
    /// its version.
    pub fn connect(url: &str) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("dsv-pg")
            .enable_all()
            .build()
            .map_err(|e| Error::Kv(format!("cannot start the PostgreSQL runtime: {e}")))?;
        let shared = Arc::new(Shared {
            rt,
            url: url.to_string(),
            idle: Mutex::new(Vec::new()),
        });
        let c = shared.checkout()?;
        shared.rt.block_on(async {
            c.batch_execute(
                "CREATE TABLE IF NOT EXISTS dsv_kv (
                     cf smallint NOT NULL, k bytea NOT NULL, v bytea NOT NULL,
                     PRIMARY KEY (cf, k));
                 CREATE TABLE IF NOT EXISTS dsv_schema (version integer NOT NULL);",
            )
            .await
            .map_err(|e| map_err("create the schema", e))?;
            let rows = c
                .query("SELECT version FROM dsv_schema", &[])
                .await
                .map_err(|e| map_err("read the schema version", e))?;
            match rows.first().map(|r| r.get::<_, i32>(0)) {
                None => {
                    c.execute(
                        "INSERT INTO dsv_schema (version) VALUES ($1)",
                        &[&SCHEMA_VERSION],
                    )
                    .await
                    .map_err(|e| map_err("write the schema version", e))?;
                }
                Some(v) if v > SCHEMA_VERSION => {
                    return Err(Error::Kv(format!(
                        "the database holds dsv schema {v}; this dsv knows {SCHEMA_VERSION}: upgrade dsv"
                    )))
                }
                Some(_) => {}
            }
            Ok(())
        })?;
        shared.give_back(c);
        Ok(Self { shared })
    }
}

/// Reads on one connection inside a transaction.
struct TxnReader<'a> {
    shared: &'a Shared,
    client: &'a Client,
}

impl TxnReader<'_> {
    fn rows(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        self.shared.rt.block_on(async {
            let rows = self
                .client
                .query(sql, params)
                .await
                .map_err(|e| map_err("read", e))?;
            Ok(rows
                .into_iter()
                .map(|r| (r.get::<_, Vec<u8>>(0), r.get::<_, Vec<u8>>(1)))
                .collect())
        })
    }
}

impl KvRead for TxnReader<'_> {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let key = key.to_vec();
        Ok(self
            .rows(
                "SELECT k, v FROM dsv_kv WHERE cf = $1 AND k = $2",
                &[&cf_code(cf), &key],
            )?
            .pop()
            .map(|(_, v)| v))
    }

    fn scan_from(
        &self,
        cf: Cf,
        prefix: &[u8],
        start: &[u8],
        visit: &mut Visitor<'_>,
    ) -> Result<()> {
        let code = cf_code(cf);
        let upper = prefix_successor(prefix);
        let mut from = if start.is_empty() { prefix } else { start }.to_vec();
        let mut inclusive = true;
        loop {
            let sql = if inclusive {
                "SELECT k, v FROM dsv_kv WHERE cf = $1 AND k >= $2 \
                 AND ($3::bytea IS NULL OR k < $3) ORDER BY k LIMIT $4"
            } else {
                "SELECT k, v FROM dsv_kv WHERE cf = $1 AND k > $2 \
                 AND ($3::bytea IS NULL OR k < $3) ORDER BY k LIMIT $4"
            };
            let page = self.rows(sql, &[&code, &from, &upper, &PAGE])?;
            let n = page.len() as i64;
            for (k, v) in &page {
                if !k.starts_with(prefix) {
                    return Ok(());
                }
                if !visit(k, v)? {
                    return Ok(());
                }
            }
            match page.into_iter().last() {
                Some((k, _)) if n == PAGE => {
                    from = k;
                    inclusive = false;
                }
                _ => return Ok(()),
            }
        }
    }

    fn scan_rev(
        &self,
        cf: Cf,
        prefix: &[u8],
        before: &[u8],
        visit: &mut Visitor<'_>,
    ) -> Result<()> {
        let code = cf_code(cf);
        let mut upper: Option<Vec<u8>> = if before.is_empty() {
            prefix_successor(prefix)
        } else {
            Some(before.to_vec())
        };
        let lower = prefix.to_vec();
        loop {
            let page = self.rows(
                "SELECT k, v FROM dsv_kv WHERE cf = $1 AND k >= $2 \
                 AND ($3::bytea IS NULL OR k < $3) ORDER BY k DESC LIMIT $4",
                &[&code, &lower, &upper, &PAGE],
            )?;
            let n = page.len() as i64;
            for (k, v) in &page {
                if !visit(k, v)? {
                    return Ok(());
                }
            }
            match page.into_iter().last() {
                Some((k, _)) if n == PAGE => upper = Some(k),
                _ => return Ok(()),
            }
        }
    }
}

/// A point-in-time view: a read-only repeatable-read transaction on its
/// own connection, ended when dropped.
struct PgView {
    shared: Arc<Shared>,
    client: Option<Client>,
}

impl KvRead for PgView {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.reader()?.get(cf, key)
    }
    fn scan_from(
        &self,
        cf: Cf,
        prefix: &[u8],
        start: &[u8],
        visit: &mut Visitor<'_>,
    ) -> Result<()> {
        self.reader()?.scan_from(cf, prefix, start, visit)
    }
    fn scan_rev(
        &self,
        cf: Cf,
        prefix: &[u8],
        before: &[u8],
        visit: &mut Visitor<'_>,
    ) -> Result<()> {
        self.reader()?.scan_rev(cf, prefix, before, visit)
    }
}

impl PgView {
    fn reader(&self) -> Result<TxnReader<'_>> {
        Ok(TxnReader {
            shared: &self.shared,
            client: self
                .client
                .as_ref()
                .ok_or_else(|| Error::Kv("a closed PostgreSQL view".into()))?,
        })
    }
}

impl Drop for PgView {
    fn drop(&mut self) {
        if let Some(c) = self.client.take() {
            // Ended here when no async context is current; otherwise the
            // connection is simply closed (its transaction with it).
            if tokio::runtime::Handle::try_current().is_err() {
                let ok = self.shared.rt.block_on(c.batch_execute("COMMIT")).is_ok();
                if ok {
                    self.shared.give_back(c);
                }
            }
        }
    }
}

fn exec(shared: &Shared, c: &Client, sql: &str, what: &str) -> Result<()> {
    shared
        .rt
        .block_on(c.batch_execute(sql))
        .map_err(|e| map_err(what, e))
}

/// The last op per key, split into puts and deletes.
#[allow(clippy::type_complexity)]
fn coalesce(batch: Batch) -> (Vec<(i16, Vec<u8>, Vec<u8>)>, Vec<(i16, Vec<u8>)>) {
    let mut last: std::collections::BTreeMap<(i16, Vec<u8>), Option<Vec<u8>>> =
        Default::default();
    for op in batch.ops {
        match op {
            Op::Put(cf, k, v) => last.insert((cf_code(cf), k), Some(v)),
            Op::Delete(cf, k) => last.insert((cf_code(cf), k), None),
        };
    }
    let mut puts = Vec::new();
    let mut dels = Vec::new();
    for ((cf, k), v) in last {
        match v {
            Some(v) => puts.push((cf, k, v)),
            None => dels.push((cf, k)),
        }
    }
    (puts, dels)
}

impl Backend for PgKv {
    fn open_read(&self) -> Result<Arc<dyn KvRead>> {
        let c = self.shared.checkout()?;
        // The snapshot is taken by the first statement after BEGIN.
        exec(
            &self.shared,
            &c,
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SELECT 1",
            "begin a snapshot",
        )?;
        Ok(Arc::new(PgView {
            shared: self.shared.clone(),
            client: Some(c),
        }))
    }

    fn transact(&self, body: &mut TxnBody<'_>) -> Result<()> {
        let shared = &*self.shared;
        let c = shared.checkout()?;
        exec(shared, &c, "BEGIN ISOLATION LEVEL SERIALIZABLE", "begin")?;
        let outcome = (|| {
            let reader = TxnReader { shared, client: &c };
            let mut batch = body(&reader)?;
            if batch.is_empty() {
                return Ok(false);
            }
            dsv_store::txn::seal(&mut batch, &mut |k| {
                Ok(reader
                    .get(Cf::Meta, k)?
                    .and_then(|v| v.try_into().ok())
                    .map(u64::from_le_bytes)
                    .unwrap_or(0))
            })?;
            let (puts, dels) = coalesce(batch);
            shared.rt.block_on(async {
                if !puts.is_empty() {
                    let cfs: Vec<i16> = puts.iter().map(|p| p.0).collect();
                    let ks: Vec<&[u8]> = puts.iter().map(|p| p.1.as_slice()).collect();
                    let vs: Vec<&[u8]> = puts.iter().map(|p| p.2.as_slice()).collect();
                    c.execute(
                        "INSERT INTO dsv_kv (cf, k, v) \
                         SELECT * FROM unnest($1::smallint[], $2::bytea[], $3::bytea[]) \
                         ON CONFLICT (cf, k) DO UPDATE SET v = EXCLUDED.v",
                        &[&cfs, &ks, &vs],
                    )
                    .await
                    .map_err(|e| map_err("write", e))?;
                }
                if !dels.is_empty() {
                    let cfs: Vec<i16> = dels.iter().map(|p| p.0).collect();
                    let ks: Vec<&[u8]> = dels.iter().map(|p| p.1.as_slice()).collect();
                    c.execute(
                        "DELETE FROM dsv_kv USING unnest($1::smallint[], $2::bytea[]) AS d(cf, k) \
                         WHERE dsv_kv.cf = d.cf AND dsv_kv.k = d.k",
                        &[&cfs, &ks],
                    )
                    .await
                    .map_err(|e| map_err("delete", e))?;
                }
                c.execute("SELECT pg_notify($1, '')", &[&CHANNEL])
                    .await
                    .map_err(|e| map_err("notify", e))?;
                Ok::<_, Error>(())
            })?;
            Ok(true)
        })();
        let end = match &outcome {
            Ok(true) => exec(shared, &c, "COMMIT", "commit"),
            _ => exec(shared, &c, "ROLLBACK", "roll back"),
        };
        shared.give_back(c);
        match (outcome, end) {
            (Ok(_), Ok(())) => Ok(()),
            (Ok(_), Err(e)) => Err(e),
            (Err(e), _) => Err(e),
        }
    }

    fn change_source(&self) -> Result<Box<dyn ChangeSource>> {
        let signal = Arc::new((Mutex::new(0u64), Condvar::new()));
        let url = self.shared.url.clone();
        let s = signal.clone();
        let client = self.shared.rt.block_on(async move {
            let (client, mut conn) = tokio_postgres::connect(&url, NoTls)
                .await
                .map_err(|e| map_err("connect for the change feed", e))?;
            tokio::spawn(async move {
                loop {
                    let m = futures::future::poll_fn(|cx| conn.poll_message(cx)).await;
                    match m {
                        Some(Ok(tokio_postgres::AsyncMessage::Notification(_))) => {
                            let (n, cv) = &*s;
                            if let Ok(mut n) = n.lock() {
                                *n += 1;
                                cv.notify_all();
                            }
                        }
                        Some(Ok(_)) => {}
                        // Closed: waiters fall back to polling.
                        Some(Err(_)) | None => {
                            let (n, cv) = &*s;
                            if let Ok(mut n) = n.lock() {
                                *n += 1;
                                cv.notify_all();
                            }
                            break;
                        }
                    }
                }
            });
            client
                .batch_execute(&format!("LISTEN {CHANNEL}"))
                .await
                .map_err(|e| map_err("listen", e))?;
            Ok::<_, Error>(client)
        })?;
        let seen = *signal.0.lock().map_err(|_| poisoned())?;
        Ok(Box::new(PgChanges {
            _client: client,
            signal,
            seen,
        }))
    }
}

use dsv_store::txn::ChangeSource;

/// Wake-ups from `LISTEN dsv_changes`.
struct PgChanges {
    _client: Client,
    signal: Arc<(Mutex<u64>, Condvar)>,
    seen: u64,
}

impl ChangeSource for PgChanges {
    fn wait(&mut self, timeout: Duration) -> Result<()> {
        let (n, cv) = &*self.signal;
        let n = n.lock().map_err(|_| poisoned())?;
        let (n, _) = cv
            .wait_timeout_while(n, timeout, |n| *n == self.seen)
            .map_err(|_| poisoned())?;
        self.seen = *n;
        Ok(())
    }
}
