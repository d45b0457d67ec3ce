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

use dsv_store::kv::{prefix_successor, Backend, Batch, Cf, KvRead, Op, TxnBody, Visitor, ALL_CFS};
use dsv_store::{Error, Result};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls, Statement};

/// The schema version this build writes and reads.
pub const SCHEMA_VERSION: i32 = 1;
/// Rows read by the first page of a scan (most scans stop early: the first
/// entry of a queue, the last event); each next page is four times larger.
const FIRST_PAGE: i64 = 32;
/// The largest page.
const MAX_PAGE: i64 = 8192;
/// The notification channel.
const CHANNEL: &str = "dsv_changes";

fn cf_code(cf: Cf) -> i16 {
    ALL_CFS.iter().position(|c| *c == cf).unwrap_or(0) as i16
}

/// How to reach the database. The library reads no environment and no
/// password file: the caller (the CLI) resolves the password from
/// `PGPASSWORD` or `.pgpass` and passes it here.
#[derive(Clone, Default)]
pub struct PgOptions {
    /// The password, when the URL has none.
    pub password: Option<String>,
    /// `application_name` (shown by `pg_stat_activity`).
    pub application_name: Option<String>,
    /// Longest a statement may run.
    pub statement_timeout: Option<Duration>,
    /// Longest a writer waits for the writers' lock (after a conflict).
    pub lock_timeout: Option<Duration>,
}

impl std::fmt::Debug for PgOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgOptions")
            .field("password", &self.password.as_ref().map(|_| "…"))
            .field("application_name", &self.application_name)
            .finish_non_exhaustive()
    }
}

/// `user@host:port/db` of a connection string: what errors name (never
/// the password).
pub fn describe(url: &str) -> String {
    match url.parse::<tokio_postgres::Config>() {
        Ok(c) => {
            let host = c
                .get_hosts()
                .first()
                .map(|h| match h {
                    tokio_postgres::config::Host::Tcp(h) => h.clone(),
                    tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
                })
                .unwrap_or_else(|| "localhost".into());
            let port = c.get_ports().first().copied().unwrap_or(5432);
            format!(
                "postgres://{}@{host}:{port}/{}",
                c.get_user().unwrap_or("?"),
                c.get_dbname().unwrap_or("?")
            )
        }
        Err(_) => "the PostgreSQL URL".into(),
    }
}

/// Whether a connection string carries a password.
pub fn has_password(url: &str) -> bool {
    url.parse::<tokio_postgres::Config>()
        .map(|c| c.get_password().is_some())
        .unwrap_or(false)
}

/// Maps a PostgreSQL error onto the seam's errors; `at` names the database.
fn map_err(at: &str, what: &str, e: tokio_postgres::Error) -> Error {
    use tokio_postgres::error::SqlState;
    if let Some(code) = e.code() {
        if *code == SqlState::T_R_SERIALIZATION_FAILURE || *code == SqlState::T_R_DEADLOCK_DETECTED
        {
            return Error::Conflict {
                what: format!("{what}: a concurrent transaction ({})", code.code()),
                tries: 1,
            };
        }
        if *code == SqlState::INVALID_PASSWORD
            || *code == SqlState::INVALID_AUTHORIZATION_SPECIFICATION
        {
            return Error::Unavailable(format!(
                "{at} refused the credentials: {} (give the password in PGPASSWORD or ~/.pgpass)",
                e.as_db_error().map(|d| d.message()).unwrap_or("")
            ));
        }
        if *code == SqlState::INVALID_CATALOG_NAME {
            return Error::Unavailable(format!(
                "{at}: {} (create it first: createdb)",
                e.as_db_error()
                    .map(|d| d.message())
                    .unwrap_or("no such database")
            ));
        }
        if *code == SqlState::ADMIN_SHUTDOWN
            || *code == SqlState::CANNOT_CONNECT_NOW
            || *code == SqlState::QUERY_CANCELED
            || *code == SqlState::LOCK_NOT_AVAILABLE
            || *code == SqlState::TOO_MANY_CONNECTIONS
        {
            return Error::Unavailable(format!("{at}: {what}: {e}"));
        }
    }
    let chain = format!(
        "{e} {}",
        std::error::Error::source(&e)
            .map(|s| s.to_string())
            .unwrap_or_default()
    );
    if chain.contains("password missing") {
        return Error::Unavailable(format!(
            "{at} refused the credentials: it asks for a password and none was given \
             (set PGPASSWORD or add a ~/.pgpass line)"
        ));
    }
    if e.is_closed() || e.as_db_error().is_none() {
        let cause = std::error::Error::source(&e)
            .map(|s| format!(": {s}"))
            .unwrap_or_default();
        return Error::Unavailable(format!("{at}: {what}: {e}{cause}"));
    }
    Error::Kv(format!("{at}: {what}: {e}"))
}

struct Shared {
    rt: tokio::runtime::Runtime,
    config: tokio_postgres::Config,
    at: String,
    idle: Mutex<Vec<Conn>>,
    lock_timeout_ms: u64,
}

/// Attempts to connect before giving up (with backoff between them).
const CONNECT_TRIES: u32 = 4;

impl Shared {
    async fn connect_once(
        config: &tokio_postgres::Config,
        at: &str,
    ) -> Result<(
        Client,
        tokio_postgres::Connection<tokio_postgres::Socket, tokio_postgres::tls::NoTlsStream>,
    )> {
        config
            .connect(NoTls)
            .await
            .map_err(|e| map_err(at, "connect", e))
    }

    /// Connects, retrying with backoff (100 ms, 400 ms, 1.6 s) while the
    /// server is unreachable; refused credentials fail at once.
    fn connect(&self) -> Result<Conn> {
        self.rt.block_on(async {
            let mut delay = Duration::from_millis(100);
            let mut tries = 0;
            loop {
                tries += 1;
                match Self::connect_once(&self.config, &self.at).await {
                    Ok((client, conn)) => {
                        tokio::spawn(async move {
                            if let Err(e) = conn.await {
                                tracing::debug!("PostgreSQL connection ended: {e}");
                            }
                        });
                        return Ok(Conn::new(client));
                    }
                    Err(Error::Unavailable(m))
                        if tries < CONNECT_TRIES && !m.contains("refused the credentials") =>
                    {
                        tracing::debug!("{m}; retrying in {delay:?}");
                        tokio::time::sleep(delay).await;
                        delay *= 4;
                    }
                    Err(e) => return Err(e),
                }
            }
        })
    }

    fn checkout(&self) -> Result<Conn> {
        loop {
            let c = self.idle.lock().map_err(|_| poisoned())?.pop();
            match c {
                Some(c) if !c.is_closed() => return Ok(c),
                Some(_) => continue,
                None => return self.connect(),
            }
        }
    }

    fn give_back(&self, c: Conn) {
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

/// A connection and its prepared statements (each query text is parsed
/// once per connection, not once per call: a read is one round trip).
struct Conn {
    client: Client,
    stmts: Mutex<std::collections::HashMap<&'static str, Statement>>,
}

impl std::ops::Deref for Conn {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self.client
    }
}

impl Conn {
    fn new(client: Client) -> Self {
        Conn {
            client,
            stmts: Mutex::new(Default::default()),
        }
    }

    async fn stmt(
        &self,
        sql: &'static str,
    ) -> std::result::Result<Statement, tokio_postgres::Error> {
        if let Some(s) = self.stmts.lock().ok().and_then(|m| m.get(sql).cloned()) {
            return Ok(s);
        }
        let s = self.client.prepare(sql).await?;
        if let Ok(mut m) = self.stmts.lock() {
            m.insert(sql, s.clone());
        }
        Ok(s)
    }
}

/// A PostgreSQL database holding one repository's metadata.
pub struct PgKv {
    shared: Arc<Shared>,
    /// When a transaction last failed on a conflict, ms.
    last_conflict_ms: std::sync::atomic::AtomicI64,
}

impl std::fmt::Debug for PgKv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the password.
        f.debug_struct("PgKv")
            .field("at", &self.shared.at)
            .finish_non_exhaustive()
    }
}

/// Key of the advisory lock that serializes schema migrations.
const MIGRATION_LOCK: i64 = 0x0064_7376_5f6d_6967;

/// The migrations, in order: migration `i` brings the schema to version
/// `i + 1`.
const MIGRATIONS: &[&str] = &[
    // 1: the key-value table (bytea sorts bytewise, as RocksDB does) and
    // the writers' lock table (empty; locked after a conflict).
    "CREATE TABLE dsv_kv (cf smallint NOT NULL, k bytea NOT NULL, v bytea NOT NULL, \
         PRIMARY KEY (cf, k)); \
     CREATE TABLE dsv_wlock ();",
];

impl PgKv {
    /// Connects to `url` (`postgres://user@host:port/db`, or key=value
    /// pairs), brings an empty database to this build's schema (migrations
    /// run in one transaction, serialized across machines by an advisory
    /// lock), and refuses a schema newer than this build's.
    pub fn connect(url: &str, opts: &PgOptions) -> Result<Self> {
        let at = describe(url);
        let mut config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| Error::Invalid(format!("{at}: not a PostgreSQL URL: {e}")))?;
        if config.get_password().is_none() {
            if let Some(p) = &opts.password {
                config.password(p.as_bytes());
            }
        }
        config.application_name(opts.application_name.as_deref().unwrap_or("dsv"));
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        config.keepalives(true);
        config.keepalives_idle(Duration::from_secs(30));
        config.tcp_user_timeout(Duration::from_secs(60));
        let statement = opts.statement_timeout.unwrap_or(Duration::from_secs(300));
        // After the URL's own options (which win where they repeat ours).
        let ours = format!(
            "-c statement_timeout={} -c idle_in_transaction_session_timeout=3600000",
            statement.as_millis()
        );
        let all = match config.get_options() {
            Some(theirs) if !theirs.trim().is_empty() => format!("{ours} {theirs}"),
            _ => ours,
        };
        config.options(all);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("dsv-pg")
            .enable_all()
            .build()
            .map_err(|e| Error::Kv(format!("cannot start the PostgreSQL runtime: {e}")))?;
        let shared = Arc::new(Shared {
            rt,
            config,
            at: at.clone(),
            idle: Mutex::new(Vec::new()),
            // 0 would mean "wait forever" to PostgreSQL.
            lock_timeout_ms: (opts
                .lock_timeout
                .unwrap_or(Duration::from_secs(60))
                .as_millis() as u64)
                .max(1),
        });
        let c = shared.checkout()?;
        // Fast path (every command): the schema is there and current.
        let current = shared.rt.block_on(async {
            c.query_opt("SELECT max(version) FROM dsv_schema", &[])
                .await
                .ok()
                .flatten()
                .and_then(|r| r.get::<_, Option<i32>>(0))
        });
        if current == Some(SCHEMA_VERSION) {
            shared.give_back(c);
            return Ok(Self::new(shared));
        }
        shared.rt.block_on(async {
            let e = |what: &'static str| {
                let at = at.clone();
                move |e| map_err(&at, what, e)
            };
            c.batch_execute(&format!(
                "BEGIN; SELECT pg_advisory_xact_lock({MIGRATION_LOCK}); \
                 CREATE TABLE IF NOT EXISTS dsv_schema (version integer NOT NULL, \
                     written_by text NOT NULL, at timestamptz NOT NULL DEFAULT now());"
            ))
            .await
            .map_err(e("create the schema table"))?;
            let found = c
                .query_opt("SELECT max(version) FROM dsv_schema", &[])
                .await
                .map_err(e("read the schema version"))?
                .and_then(|r| r.get::<_, Option<i32>>(0))
                .unwrap_or(0);
            if found > SCHEMA_VERSION {
                let _ = c.batch_execute("ROLLBACK").await;
                return Err(Error::UnsupportedFormatVersion {
                    what: format!("the dsv schema in {at}"),
                    found: found as u32,
                    supported: SCHEMA_VERSION as u32,
                });
            }
            for (i, m) in MIGRATIONS.iter().enumerate().skip(found as usize) {
                c.batch_execute(m).await.map_err(e("migrate the schema"))?;
                c.execute(
                    "INSERT INTO dsv_schema (version, written_by) VALUES ($1, $2)",
                    &[&(i as i32 + 1), &concat!("dsv ", env!("CARGO_PKG_VERSION"))],
                )
                .await
                .map_err(e("record the schema version"))?;
            }
            c.batch_execute("COMMIT")
                .await
                .map_err(e("commit the schema"))?;
            Ok(())
        })?;
        shared.give_back(c);
        Ok(Self::new(shared))
    }

    fn new(shared: Arc<Shared>) -> Self {
        PgKv {
            shared,
            last_conflict_ms: std::sync::atomic::AtomicI64::new(i64::MIN / 2),
        }
    }

    /// The database, as errors name it (no password).
    pub fn location(&self) -> &str {
        &self.shared.at
    }
}

/// Reads on one connection inside a transaction.
struct TxnReader<'a> {
    shared: &'a Shared,
    client: &'a Conn,
    /// A read failed on a serialization failure: whatever the body made of
    /// that error, the transaction is a conflict (and retried).
    conflicted: std::sync::atomic::AtomicBool,
}

impl<'a> TxnReader<'a> {
    fn new(shared: &'a Shared, client: &'a Conn) -> Self {
        TxnReader {
            shared,
            client,
            conflicted: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn note(&self, e: Error) -> Error {
        if matches!(e, Error::Conflict { .. }) {
            self.conflicted
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        e
    }

    fn conflicted(&self) -> bool {
        self.conflicted.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl TxnReader<'_> {
    fn rows(
        &self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        self.shared.rt.block_on(async {
            let stmt = self
                .client
                .stmt(sql)
                .await
                .map_err(|e| self.note(map_err(&self.shared.at, "prepare", e)))?;
            let rows = self
                .client
                .query(&stmt, params)
                .await
                .map_err(|e| self.note(map_err(&self.shared.at, "read", e)))?;
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
        let mut page_len = FIRST_PAGE;
        loop {
            // Both bounds are index conditions (a NULL-able bound in one
            // statement would make the generic plan read to the end of the
            // family).
            let page = match (&upper, inclusive) {
                (Some(u), true) => self.rows(
                    "SELECT k, v FROM dsv_kv WHERE cf = $1 AND k >= $2 AND k < $3 ORDER BY k LIMIT $4",
                    &[&code, &from, u, &page_len],
                )?,
                (Some(u), false) => self.rows(
                    "SELECT k, v FROM dsv_kv WHERE cf = $1 AND k > $2 AND k < $3 ORDER BY k LIMIT $4",
                    &[&code, &from, u, &page_len],
                )?,
                (None, true) => self.rows(
                    "SELECT k, v FROM dsv_kv WHERE cf = $1 AND k >= $2 ORDER BY k LIMIT $3",
                    &[&code, &from, &page_len],
                )?,
                (None, false) => self.rows(
                    "SELECT k, v FROM dsv_kv WHERE cf = $1 AND k > $2 ORDER BY k LIMIT $3",
                    &[&code, &from, &page_len],
                )?,
            };
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
                Some((k, _)) if n == page_len => {
                    from = k;
                    inclusive = false;
                    page_len = (page_len * 4).min(MAX_PAGE);
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
        let mut page_len = FIRST_PAGE;
        loop {
            let page = match &upper {
                Some(u) => self.rows(
                    "SELECT k, v FROM dsv_kv WHERE cf = $1 AND k >= $2 AND k < $3 ORDER BY k DESC LIMIT $4",
                    &[&code, &lower, u, &page_len],
                )?,
                None => self.rows(
                    "SELECT k, v FROM dsv_kv WHERE cf = $1 AND k >= $2 ORDER BY k DESC LIMIT $3",
                    &[&code, &lower, &page_len],
                )?,
            };
            let n = page.len() as i64;
            for (k, v) in &page {
                if !visit(k, v)? {
                    return Ok(());
                }
            }
            match page.into_iter().last() {
                Some((k, _)) if n == page_len => {
                    upper = Some(k);
                    page_len = (page_len * 4).min(MAX_PAGE);
                }
                _ => return Ok(()),
            }
        }
    }
}

/// A point-in-time view: a read-only repeatable-read transaction on its
/// own connection, ended when dropped. A view whose connection died (the
/// server restarted, or ended a transaction idle for an hour) starts a new
/// snapshot on the next read instead of failing forever: a long-lived
/// reader (a mount) recovers by itself.
struct PgView {
    shared: Arc<Shared>,
    conn: std::sync::RwLock<Option<Arc<Conn>>>,
}

/// A connection in a new read-only snapshot.
fn snapshot(shared: &Shared) -> Result<Conn> {
    let c = shared.checkout()?;
    // The snapshot is taken by the first statement after BEGIN.
    exec(
        shared,
        &c,
        "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SELECT 1",
        "begin a snapshot",
    )?;
    Ok(c)
}

impl PgView {
    fn conn(&self) -> Result<Arc<Conn>> {
        if let Some(c) = self.conn.read().map_err(|_| poisoned())?.as_ref() {
            if !c.is_closed() {
                return Ok(c.clone());
            }
        }
        let fresh = Arc::new(snapshot(&self.shared)?);
        tracing::debug!(
            "{}: a read view lost its connection; new snapshot",
            self.shared.at
        );
        *self.conn.write().map_err(|_| poisoned())? = Some(fresh.clone());
        Ok(fresh)
    }
}

impl KvRead for PgView {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let c = self.conn()?;
        TxnReader::new(&self.shared, &c).get(cf, key)
    }
    fn scan_from(
        &self,
        cf: Cf,
        prefix: &[u8],
        start: &[u8],
        visit: &mut Visitor<'_>,
    ) -> Result<()> {
        let c = self.conn()?;
        TxnReader::new(&self.shared, &c).scan_from(cf, prefix, start, visit)
    }
    fn scan_rev(
        &self,
        cf: Cf,
        prefix: &[u8],
        before: &[u8],
        visit: &mut Visitor<'_>,
    ) -> Result<()> {
        let c = self.conn()?;
        TxnReader::new(&self.shared, &c).scan_rev(cf, prefix, before, visit)
    }
}

impl Drop for PgView {
    fn drop(&mut self) {
        let taken = self.conn.get_mut().ok().and_then(|c| c.take());
        if let Some(c) = taken.and_then(|c| Arc::try_unwrap(c).ok()) {
            // Ended here when no async context is current; otherwise the
            // connection is simply closed (its transaction with it).
            if tokio::runtime::Handle::try_current().is_err() && !c.is_closed() {
                let ok = self.shared.rt.block_on(c.batch_execute("COMMIT")).is_ok();
                if ok {
                    self.shared.give_back(c);
                }
            }
        }
    }
}

fn exec(shared: &Shared, c: &Conn, sql: &str, what: &str) -> Result<()> {
    shared
        .rt
        .block_on(c.batch_execute(sql))
        .map_err(|e| map_err(&shared.at, what, e))
}

/// The last op per key, split into puts and deletes.
#[allow(clippy::type_complexity)]
fn coalesce(batch: Batch) -> (Vec<(i16, Vec<u8>, Vec<u8>)>, Vec<(i16, Vec<u8>)>) {
    let mut last: std::collections::BTreeMap<(i16, Vec<u8>), Option<Vec<u8>>> = Default::default();
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

impl PgKv {
    /// One attempt: `SERIALIZABLE`; with `locked`, the writers' lock is
    /// taken first (before the snapshot), so that writers queue instead of
    /// failing on the hot rows every write touches (the keyspace counters,
    /// the event sequence).
    fn attempt(&self, body: &mut TxnBody<'_>, locked: bool) -> Result<()> {
        let shared = &*self.shared;
        let c = shared.checkout()?;
        let begin = if locked {
            format!(
                "BEGIN ISOLATION LEVEL SERIALIZABLE; SET LOCAL lock_timeout = {}; \
                 LOCK TABLE dsv_wlock IN EXCLUSIVE MODE",
                shared.lock_timeout_ms
            )
        } else {
            "BEGIN ISOLATION LEVEL SERIALIZABLE".to_string()
        };
        if let Err(e) = exec(shared, &c, &begin, "begin") {
            // Possibly inside a failed transaction now (the lock timed
            // out after BEGIN): never back into the pool.
            drop(c);
            return Err(e);
        }
        let reader = TxnReader::new(shared, &c);
        let outcome = (|| {
            let mut batch = body(&reader)?;
            if batch.is_empty() {
                return Ok(false);
            }
            // The keyspace counters this batch bumps, read in one query.
            let mut counters: Vec<Vec<u8>> = Vec::new();
            for op in &batch.ops {
                let (Op::Put(cf, k, _) | Op::Delete(cf, k)) = op;
                if let Some(ks) = dsv_store::txn::keyspace_of(*cf, k) {
                    counters.push(dsv_store::txn::keyspace_counter_key(&ks));
                }
            }
            counters.sort();
            counters.dedup();
            let at = &shared.at;
            let current: std::collections::HashMap<Vec<u8>, u64> = shared.rt.block_on(async {
                let stmt = c
                    .stmt("SELECT k, v FROM dsv_kv WHERE cf = $1 AND k = ANY($2::bytea[])")
                    .await
                    .map_err(|e| map_err(at, "prepare", e))?;
                let rows = c
                    .query(&stmt, &[&cf_code(Cf::Meta), &counters])
                    .await
                    .map_err(|e| map_err(at, "read counters", e))?;
                Ok::<_, Error>(
                    rows.into_iter()
                        .map(|r| {
                            let v: Vec<u8> = r.get(1);
                            let n = v.try_into().map(u64::from_le_bytes).unwrap_or(0);
                            (r.get::<_, Vec<u8>>(0), n)
                        })
                        .collect(),
                )
            })?;
            dsv_store::txn::seal(&mut batch, &mut |k| {
                Ok(current.get(k).copied().unwrap_or(0))
            })?;
            let (puts, dels) = coalesce(batch);
            shared.rt.block_on(async {
                let (up, del, notify) = futures::try_join!(
                    c.stmt(
                        "INSERT INTO dsv_kv (cf, k, v) \
                         SELECT * FROM unnest($1::smallint[], $2::bytea[], $3::bytea[]) \
                         ON CONFLICT (cf, k) DO UPDATE SET v = EXCLUDED.v"
                    ),
                    c.stmt(
                        "DELETE FROM dsv_kv USING unnest($1::smallint[], $2::bytea[]) AS d(cf, k) \
                         WHERE dsv_kv.cf = d.cf AND dsv_kv.k = d.k"
                    ),
                    c.stmt("SELECT pg_notify($1, '')"),
                )
                .map_err(|e| map_err(at, "prepare", e))?;
                let pcfs: Vec<i16> = puts.iter().map(|p| p.0).collect();
                let pks: Vec<&[u8]> = puts.iter().map(|p| p.1.as_slice()).collect();
                let pvs: Vec<&[u8]> = puts.iter().map(|p| p.2.as_slice()).collect();
                let dcfs: Vec<i16> = dels.iter().map(|p| p.0).collect();
                let dks: Vec<&[u8]> = dels.iter().map(|p| p.1.as_slice()).collect();
                // Pipelined: one round trip for the writes and the
                // notification (delivered at commit, to every listener).
                let write = async {
                    if puts.is_empty() {
                        return Ok(0);
                    }
                    c.execute(&up, &[&pcfs, &pks, &pvs]).await
                };
                let delete = async {
                    if dels.is_empty() {
                        return Ok(0);
                    }
                    c.execute(&del, &[&dcfs, &dks]).await
                };
                futures::try_join!(write, delete, c.execute(&notify, &[&CHANNEL]))
                    .map_err(|e| map_err(at, "write", e))?;
                Ok::<_, Error>(())
            })?;
            Ok(true)
        })();
        let end = match &outcome {
            Ok(true) => exec(shared, &c, "COMMIT", "commit"),
            _ => exec(shared, &c, "ROLLBACK", "roll back"),
        };
        let conflicted = reader.conflicted();
        match &end {
            Ok(()) => shared.give_back(c),
            // A connection whose COMMIT or ROLLBACK failed is not reused.
            Err(_) => drop(c),
        }
        let result = match (outcome, end) {
            (Ok(_), Ok(())) => Ok(()),
            (Ok(_), Err(e)) => Err(e),
            (Err(e), _) => Err(e),
        };
        match result {
            // A read hit a serialization failure that the body turned into
            // another error (or swallowed): the transaction conflicted.
            Err(e) if conflicted && !matches!(e, Error::Conflict { .. }) => Err(Error::Conflict {
                what: format!("a concurrent transaction (then: {e})"),
                tries: 1,
            }),
            r => r,
        }
    }
}

/// Attempts of one transaction inside [`Backend::transact`] behind the
/// writers' lock (after an optimistic one, unless contended).
const LOCKED_TRIES: usize = 4;
/// How long after a conflict a connection's writers take the lock first.
const CONTENDED_FOR_MS: i64 = 2_000;

impl Backend for PgKv {
    fn open_read(&self) -> Result<Arc<dyn KvRead>> {
        let c = snapshot(&self.shared)?;
        Ok(Arc::new(PgView {
            shared: self.shared.clone(),
            conn: std::sync::RwLock::new(Some(Arc::new(c))),
        }))
    }

    fn transact(&self, body: &mut TxnBody<'_>) -> Result<()> {
        // Optimistic while writers rarely collide; behind the lock at once
        // for a while after a conflict (contended writers queue instead of
        // repeating work that will fail).
        let now = dsv_store::store::now_ms();
        let contended = now
            - self
                .last_conflict_ms
                .load(std::sync::atomic::Ordering::Relaxed)
            < CONTENDED_FOR_MS;
        if !contended {
            match self.attempt(body, false) {
                Err(Error::Conflict { .. }) => self
                    .last_conflict_ms
                    .store(now, std::sync::atomic::Ordering::Relaxed),
                other => return other,
            }
        }
        let mut last = None;
        for _ in 0..LOCKED_TRIES {
            match self.attempt(body, true) {
                // A serialization failure is still possible behind the
                // lock (a reader's predicate lock, an index page split).
                Err(e @ Error::Conflict { .. }) => last = Some(e),
                other => return other,
            }
        }
        Err(last.expect("LOCKED_TRIES > 0"))
    }

    fn change_source(&self) -> Result<Box<dyn ChangeSource>> {
        let signal = Arc::new((Mutex::new(0u64), Condvar::new()));
        let config = self.shared.config.clone();
        let at = self.shared.at.clone();
        // The first connection is made here so that an unreachable
        // database is an error now; later losses reconnect with backoff.
        let first = self
            .shared
            .rt
            .block_on(Shared::connect_once(&config, &at))?;
        let s = signal.clone();
        let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
        self.shared.rt.spawn(async move {
            let wake = |s: &Arc<(Mutex<u64>, Condvar)>| {
                let (n, cv) = &**s;
                if let Ok(mut n) = n.lock() {
                    *n += 1;
                    cv.notify_all();
                }
            };
            let mut next = Some(first);
            let mut delay = Duration::from_millis(100);
            loop {
                let (client, mut conn) = match next.take() {
                    Some(pair) => pair,
                    None => {
                        tokio::select! {
                            _ = &mut stop_rx => return,
                            _ = tokio::time::sleep(delay) => {}
                        }
                        delay = (delay * 2).min(Duration::from_secs(5));
                        match Shared::connect_once(&config, &at).await {
                            Ok(pair) => pair,
                            Err(e) => {
                                tracing::debug!("change feed: {e}");
                                continue;
                            }
                        }
                    }
                };
                // The connection must be polled for LISTEN to complete.
                let sql = format!("LISTEN {CHANNEL}");
                let listen = client.batch_execute(&sql);
                tokio::pin!(listen);
                let mut listening = false;
                loop {
                    tokio::select! {
                        _ = &mut stop_rx => return,
                        r = &mut listen, if !listening => {
                            listening = true;
                            if r.is_err() {
                                break;
                            }
                            delay = Duration::from_millis(100);
                            // Changes while disconnected were not seen.
                            wake(&s);
                        }
                        m = futures::future::poll_fn(|cx| conn.poll_message(cx)) => match m {
                            Some(Ok(tokio_postgres::AsyncMessage::Notification(_))) => wake(&s),
                            Some(Ok(_)) => {}
                            Some(Err(_)) | None => break,
                        }
                    }
                }
                wake(&s);
                tracing::debug!("change feed: the connection to {at} ended; reconnecting");
            }
        });
        let seen = *signal.0.lock().map_err(|_| poisoned())?;
        Ok(Box::new(PgChanges {
            _stop: stop_tx,
            signal,
            seen,
        }))
    }
}

use dsv_store::txn::ChangeSource;

/// Wake-ups from `LISTEN dsv_changes` (a task on the backend's runtime
/// holds the connection and reconnects it; dropping this stops it).
struct PgChanges {
    _stop: tokio::sync::oneshot::Sender<()>,
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
