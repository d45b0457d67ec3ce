//! # dsv-pg
//!
//! The metadata seam ([`dsv_store::kv::Backend`]) on PostgreSQL, for a team
//! repository shared by several machines.
//!
//! - **Layout**: one table `dsv_kv (cf smallint, k bytea, v bytea, primary
//!   key (cf, k))`; `bytea` sorts bytewise, as RocksDB does, so prefix
//!   scans are index range scans in both directions (read in pages).
//!   `dsv_schema (version)` is checked at connect.
//! - **Transactions**: the body runs at `READ COMMITTED` on a pooled
//!   connection with its reads recorded; the commit takes an advisory lock
//!   (`pg_advisory_xact_lock`, held to the end of the transaction), checks
//!   every read again (a difference is the seam's retryable
//!   [`Error::Conflict`]), numbers the batch's appends, bumps the keyspace
//!   counters ([`dsv_store::txn::seal`]) and writes — one upsert, one
//!   delete, the notification and `COMMIT` in one pipelined round trip.
//!   Writers commit one at a time but run their bodies concurrently. After
//!   a conflict, a connection's writers take the lock first for a while
//!   (contended writers queue instead of repeating work that will fail).
//! - **Claims** ([`Backend::claim`], a job queue's dequeue): the first
//!   entry under each prefix is taken with `FOR UPDATE SKIP LOCKED`, so
//!   concurrent agents get different tasks instead of conflicting on the
//!   first; a commit that changes an `app` row a claimer holds locks it with
//!   `SKIP LOCKED` first and is a conflict when one is busy (never a
//!   deadlock).
//! - **Event log**: appended records are numbered at commit under the lock:
//!   a gap-free sequence in commit order, with no transaction reading the
//!   counter; `dsv_events` shows the log as a relation (`seq`, `time_ms`,
//!   `kind`, `project`, `name`, `event` jsonb) for SQL readers.
//! - **Snapshots**: a view is a `REPEATABLE READ READ ONLY` transaction on
//!   its own connection, ended when the view is dropped.
//! - **Change feed**: every commit `NOTIFY`s `dsv_changes` (delivered at
//!   commit); a change source holds a connection that `LISTEN`s and wakes
//!   its waiter.
//!
//! Synchronous facade: the async client runs on this crate's own
//! current-thread tokio runtime, one per pool, driven by the calling thread
//! for the length of each call (no hand-off to a worker thread per round
//! trip), so callers (rayon workers, the CLI) never block an async
//! executor of theirs. Between calls nothing polls the pooled connections:
//! one is settled (what arrived for it taken in) before it is reused, and a
//! view whose read failed asks whether its connection is gone. The change
//! feed, which must take in notifications while nothing else runs, has its
//! own one-worker runtime.
//! - **Plans**: the server-side functions plan their statements once per
//!   connection (schema 4, `plan_cache_mode = force_generic_plan`).

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use dsv_store::kv::{
    prefix_successor, Backend, Batch, Cf, ClaimBody, KvRead, Op, TxnBody, Visitor, ALL_CFS,
};
use dsv_store::{Error, Result};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls, Statement};

/// The schema version this build writes and reads.
pub const SCHEMA_VERSION: i32 = 4;
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
    /// Longest a writer waits for the write lock.
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
    // The server's own words ("db error" alone says nothing).
    match e.as_db_error() {
        Some(db) => Error::Kv(format!(
            "{at}: {what}: {} (SQLSTATE {}){}",
            db.message(),
            db.code().code(),
            db.detail().map(|d| format!(": {d}")).unwrap_or_default()
        )),
        None => Error::Kv(format!("{at}: {what}: {e}")),
    }
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

    /// Lets the runtime take in what arrived for idle connections (a
    /// server that ended one: its connection task sees the end and the
    /// client reports closed). A yield resumes only after the driver was
    /// polled and the tasks it woke ran.
    fn settle(&self) {
        self.rt.block_on(async {
            for _ in 0..3 {
                tokio::task::yield_now().await;
            }
        });
    }

    /// Whether `c` is gone (the server ended it): closed after what arrived
    /// is taken in, or after one empty statement.
    fn lost(&self, c: &Conn) -> bool {
        self.settle();
        if c.is_closed() {
            return true;
        }
        let _ = self.rt.block_on(c.simple_query(""));
        self.settle();
        c.is_closed()
    }

    fn checkout(&self) -> Result<Conn> {
        loop {
            let c = self.idle.lock().map_err(|_| poisoned())?.pop();
            if c.is_some() {
                self.settle();
            }
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

/// One run of the sequencer: > 0 staged commits numbered, 0 nothing
/// staged, -1 another writer is numbering.
const SEQUENCE_SQL: &str = "SELECT dsv_sequence(7::smallint)";

impl Conn {
    /// One run of the sequencer ([`SEQUENCE_SQL`], prepared as `stmt`).
    async fn sequence(&self, stmt: &Statement) -> std::result::Result<i64, tokio_postgres::Error> {
        self.client
            .query_one(stmt, &[])
            .await
            .map(|r| r.get::<_, i64>(0))
    }

    /// After a run (`last`) that numbered something, runs the sequencer
    /// again until a run finds nothing or the lock taken (at most
    /// [`SEQUENCER_PASSES`] times): a writer that committed while this one
    /// held the lock left its staging to it.
    async fn sequence_after(
        &self,
        stmt: &Statement,
        mut last: std::result::Result<i64, tokio_postgres::Error>,
    ) -> std::result::Result<(), tokio_postgres::Error> {
        for _ in 0..SEQUENCER_PASSES {
            if last? <= 0 {
                return Ok(());
            }
            last = self.sequence(stmt).await;
        }
        Ok(())
    }

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
    /// The server's clock minus this machine's, ms, and when (local ms) it
    /// was measured (0: never).
    clock: Mutex<(i64, i64)>,
}

/// How long a measured clock offset is trusted, ms.
const CLOCK_TTL_MS: i64 = 300_000;

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
    // 2: commits under an advisory lock at READ COMMITTED (claims with
    // SKIP LOCKED; a build that writes SERIALIZABLE must not share the
    // database with one that does not, hence the version); the event log
    // as a relation for SQL readers: `app` keys `ev/` · seq (u64 BE), with
    // the record's number (an appended record does not carry it).
    "DROP TABLE dsv_wlock; \
     CREATE VIEW dsv_events AS \
       SELECT e.seq, (e.ev->>'time_ms')::bigint AS time_ms, e.ev->>'kind' AS kind, \
              e.ev->>'project' AS project, e.ev->>'name' AS name, \
              jsonb_set(e.ev, '{seq}', to_jsonb(e.seq)) AS event \
       FROM (SELECT ('x' || encode(substring(k FROM 4 FOR 8), 'hex'))::bit(64)::bigint AS seq, \
                    convert_from(v, 'UTF8')::jsonb AS ev \
             FROM dsv_kv WHERE cf = 8 AND k >= '\\x65762f'::bytea AND k < '\\x657630'::bytea \
               AND length(k) = 11) e; \
     CREATE FUNCTION dsv_le(b bytea) RETURNS bigint LANGUAGE sql IMMUTABLE AS $f$ \
       SELECT CASE WHEN b IS NULL OR length(b) <> 8 THEN 0 ELSE \
         (get_byte(b, 0)::bigint) | (get_byte(b, 1)::bigint << 8) \
         | (get_byte(b, 2)::bigint << 16) | (get_byte(b, 3)::bigint << 24) \
         | (get_byte(b, 4)::bigint << 32) | (get_byte(b, 5)::bigint << 40) \
         | (get_byte(b, 6)::bigint << 48) | (get_byte(b, 7)::bigint << 56) END $f$; \
     CREATE FUNCTION dsv_le_bytes(n bigint) RETURNS bytea LANGUAGE sql IMMUTABLE AS $f$ \
       SELECT int8send(((n & 255) << 56) | (((n >> 8) & 255) << 48) \
         | (((n >> 16) & 255) << 40) | (((n >> 24) & 255) << 32) \
         | (((n >> 32) & 255) << 24) | (((n >> 40) & 255) << 16) \
         | (((n >> 48) & 255) << 8) | ((n >> 56) & 255)) $f$; \
     CREATE FUNCTION dsv_commit( \
         e_cf smallint[], e_k bytea[], e_v bytea[], app smallint, lock_k bytea[], \
         p_cf smallint[], p_k bytea[], p_v bytea[], d_cf smallint[], d_k bytea[], \
         s_cf smallint[], s_k bytea[], a_cf smallint[], a_p bytea[], a_v bytea[], \
         meta smallint, bump bytea[]) RETURNS void LANGUAGE plpgsql AS $f$ \
     DECLARE \
       bad_k bytea; key bytea; sq record; n bigint; cnt bigint; \
     BEGIN \
       PERFORM pg_advisory_xact_lock(28274449916064361); \
       IF cardinality(e_k) > 0 THEN \
       SELECT e.k INTO bad_k FROM unnest(e_cf, e_k, e_v) AS e(cf, k, v) \
         WHERE (SELECT kv.v FROM dsv_kv kv WHERE kv.cf = e.cf AND kv.k = e.k) \
               IS DISTINCT FROM e.v LIMIT 1; \
       END IF; \
       IF bad_k IS NOT NULL THEN \
         RAISE EXCEPTION USING ERRCODE = '40001', \
           MESSAGE = 'a key read by this transaction changed: ' || encode(bad_k, 'escape'); \
       END IF; \
       FOREACH key IN ARRAY lock_k LOOP \
         PERFORM 1 FROM dsv_kv WHERE cf = app AND k = key FOR UPDATE SKIP LOCKED; \
         IF NOT FOUND AND EXISTS (SELECT 1 FROM dsv_kv WHERE cf = app AND k = key) THEN \
           RAISE EXCEPTION USING ERRCODE = '40001', \
             MESSAGE = 'a row another agent is claiming: ' || encode(key, 'escape'); \
         END IF; \
       END LOOP; \
       IF cardinality(d_k) > 0 THEN \
       DELETE FROM dsv_kv USING unnest(d_cf, d_k) AS d(cf, k) \
         WHERE dsv_kv.cf = d.cf AND dsv_kv.k = d.k; \
       END IF; \
       INSERT INTO dsv_kv (cf, k, v) SELECT * FROM unnest(p_cf, p_k, p_v) \
         ON CONFLICT (cf, k) DO UPDATE SET v = EXCLUDED.v; \
       IF cardinality(a_v) > 0 THEN \
         FOR sq IN SELECT DISTINCT cf, k FROM unnest(s_cf, s_k) AS t(cf, k) LOOP \
           n := coalesce((SELECT dsv_le(v) FROM dsv_kv WHERE cf = sq.cf AND k = sq.k), 0); \
           INSERT INTO dsv_kv (cf, k, v) \
             SELECT a.cf, a.p || int8send(n + row_number() OVER (ORDER BY a.o)), a.v \
             FROM unnest(s_cf, s_k, a_cf, a_p, a_v) WITH ORDINALITY AS a(scf, sk, cf, p, v, o) \
             WHERE a.scf = sq.cf AND a.sk = sq.k; \
           GET DIAGNOSTICS cnt = ROW_COUNT; \
           n := n + cnt; \
           UPDATE dsv_kv SET v = dsv_le_bytes(n) WHERE cf = sq.cf AND k = sq.k; \
           IF NOT FOUND THEN \
             INSERT INTO dsv_kv (cf, k, v) VALUES (sq.cf, sq.k, dsv_le_bytes(n)); \
           END IF; \
         END LOOP; \
       END IF; \
       IF cardinality(bump) > 0 THEN \
         UPDATE dsv_kv SET v = dsv_le_bytes(dsv_le(v) + 1) WHERE cf = meta AND k = ANY(bump); \
         GET DIAGNOSTICS cnt = ROW_COUNT; \
         IF cnt < cardinality(bump) THEN \
           INSERT INTO dsv_kv (cf, k, v) SELECT meta, b.k, dsv_le_bytes(1) \
             FROM unnest(bump) AS b(k) \
             WHERE NOT EXISTS (SELECT 1 FROM dsv_kv WHERE cf = meta AND k = b.k); \
         END IF; \
       END IF; \
       PERFORM pg_notify('dsv_changes', ''); \
     END $f$;",
    // 3: commits no longer run one at a time. A commit takes the write
    // lock shared, and advisory locks per key it reads (shared) or writes
    // (exclusive), in one global order; checks its point reads; writes; and
    // *stages* its appends and keyspace-counter bumps (`dsv_stage`). The
    // sequencer (`dsv_number`, under a lock that is only ever tried) numbers
    // the staged appends gap-free in staging order, bumps the counters and
    // notifies, for many commits at once: run inside a commit that gets the
    // lock (a lone writer numbers its own appends in its own transaction),
    // and by every writer after its COMMIT (`dsv_sequence`). A writer
    // that validates scans, or that conflicted, takes the write lock
    // exclusively. The counter conversions are PL/pgSQL (a SQL function
    // that is not inlined is planned again in every statement calling it).
    "CREATE OR REPLACE FUNCTION dsv_le(b bytea) RETURNS bigint LANGUAGE plpgsql IMMUTABLE AS $f$ \
     BEGIN \
       IF b IS NULL OR length(b) <> 8 THEN RETURN 0; END IF; \
       RETURN (get_byte(b, 0)::bigint) | (get_byte(b, 1)::bigint << 8) \
         | (get_byte(b, 2)::bigint << 16) | (get_byte(b, 3)::bigint << 24) \
         | (get_byte(b, 4)::bigint << 32) | (get_byte(b, 5)::bigint << 40) \
         | (get_byte(b, 6)::bigint << 48) | (get_byte(b, 7)::bigint << 56); \
     END $f$; \
     CREATE OR REPLACE FUNCTION dsv_le_bytes(n bigint) RETURNS bytea LANGUAGE plpgsql IMMUTABLE AS $f$ \
     BEGIN \
       RETURN int8send(((n & 255) << 56) | (((n >> 8) & 255) << 48) \
         | (((n >> 16) & 255) << 40) | (((n >> 24) & 255) << 32) \
         | (((n >> 32) & 255) << 24) | (((n >> 40) & 255) << 16) \
         | (((n >> 48) & 255) << 8) | ((n >> 56) & 255)); \
     END $f$; \
     CREATE SEQUENCE dsv_stage_id; \
     CREATE TABLE dsv_stage (id bigint PRIMARY KEY DEFAULT nextval('dsv_stage_id'), \
       s_cf smallint[] NOT NULL, s_k bytea[] NOT NULL, s_lk bigint[] NOT NULL, \
       a_cf smallint[] NOT NULL, a_p bytea[] NOT NULL, a_v bytea[] NOT NULL, \
       bump bytea[] NOT NULL, bump_lk bigint[] NOT NULL); \
     DROP FUNCTION dsv_commit(smallint[], bytea[], bytea[], smallint, bytea[], smallint[], \
       bytea[], bytea[], smallint[], bytea[], smallint[], bytea[], smallint[], bytea[], bytea[], \
       smallint, bytea[]); \
     CREATE FUNCTION dsv_commit( \
         lk bigint[], lx boolean[], \
         e_cf smallint[], e_k bytea[], e_v bytea[], app smallint, lock_k bytea[], \
         p_cf smallint[], p_k bytea[], p_v bytea[], d_cf smallint[], d_k bytea[], \
         s_cf smallint[], s_k bytea[], s_lk bigint[], a_cf smallint[], a_p bytea[], a_v bytea[], \
         bump bytea[], bump_lk bigint[], meta smallint) RETURNS void LANGUAGE plpgsql AS $f$ \
     DECLARE \
       bad_k bytea; key bytea; \
     BEGIN \
       PERFORM pg_advisory_xact_lock_shared(28274449916064361); \
       FOR i IN 1 .. coalesce(cardinality(lk), 0) LOOP \
         IF lx[i] THEN \
           PERFORM pg_advisory_xact_lock((lk[i] >> 32)::int, (lk[i] & 2147483647)::int); \
         ELSE \
           PERFORM pg_advisory_xact_lock_shared((lk[i] >> 32)::int, (lk[i] & 2147483647)::int); \
         END IF; \
       END LOOP; \
       IF cardinality(e_k) > 0 THEN \
       SELECT e.k INTO bad_k FROM unnest(e_cf, e_k, e_v) AS e(cf, k, v) \
         WHERE (SELECT kv.v FROM dsv_kv kv WHERE kv.cf = e.cf AND kv.k = e.k) \
               IS DISTINCT FROM e.v LIMIT 1; \
       END IF; \
       IF bad_k IS NOT NULL THEN \
         RAISE EXCEPTION USING ERRCODE = '40001', \
           MESSAGE = 'a key read by this transaction changed: ' || encode(bad_k, 'escape'); \
       END IF; \
       FOREACH key IN ARRAY lock_k LOOP \
         PERFORM 1 FROM dsv_kv WHERE cf = app AND k = key FOR UPDATE SKIP LOCKED; \
         IF NOT FOUND AND EXISTS (SELECT 1 FROM dsv_kv WHERE cf = app AND k = key) THEN \
           RAISE EXCEPTION USING ERRCODE = '40001', \
             MESSAGE = 'a row another agent is claiming: ' || encode(key, 'escape'); \
         END IF; \
       END LOOP; \
       IF cardinality(d_k) > 0 THEN \
       DELETE FROM dsv_kv USING unnest(d_cf, d_k) AS d(cf, k) \
         WHERE dsv_kv.cf = d.cf AND dsv_kv.k = d.k; \
       END IF; \
       INSERT INTO dsv_kv (cf, k, v) SELECT * FROM unnest(p_cf, p_k, p_v) \
         ON CONFLICT (cf, k) DO UPDATE SET v = EXCLUDED.v; \
       IF cardinality(a_v) > 0 OR cardinality(bump) > 0 THEN \
         INSERT INTO dsv_stage (s_cf, s_k, s_lk, a_cf, a_p, a_v, bump, bump_lk) \
           VALUES (s_cf, s_k, s_lk, a_cf, a_p, a_v, bump, bump_lk); \
         IF pg_try_advisory_xact_lock(28274449915798897) THEN \
           PERFORM dsv_number(meta); \
         END IF; \
       END IF; \
     END $f$; \
     CREATE FUNCTION dsv_sequence(meta smallint) RETURNS bigint \
       LANGUAGE plpgsql AS $f$ \
     BEGIN \
       IF NOT EXISTS (SELECT 1 FROM dsv_stage) THEN RETURN 0; END IF; \
       IF NOT pg_try_advisory_xact_lock(28274449915798897) THEN RETURN -1; END IF; \
       PERFORM pg_advisory_xact_lock_shared(28274449916064361); \
       RETURN dsv_number(meta); \
     END $f$; \
     CREATE FUNCTION dsv_number(meta smallint) RETURNS bigint \
       LANGUAGE plpgsql AS $f$ \
     DECLARE \
       ids bigint[]; sq record; n bigint; cnt bigint; lock bigint; \
     BEGIN \
       SELECT array_agg(id ORDER BY id) INTO ids FROM dsv_stage; \
       IF ids IS NULL THEN RETURN 0; END IF; \
       FOR lock IN SELECT DISTINCT l FROM dsv_stage s, \
           unnest(s.s_lk || s.bump_lk) AS u(l) WHERE s.id = ANY(ids) ORDER BY l LOOP \
         PERFORM pg_advisory_xact_lock((lock >> 32)::int, (lock & 2147483647)::int); \
       END LOOP; \
       FOR sq IN SELECT DISTINCT u.cf, u.k FROM dsv_stage s, unnest(s.s_cf, s.s_k) AS u(cf, k) \
           WHERE s.id = ANY(ids) LOOP \
         n := coalesce((SELECT dsv_le(v) FROM dsv_kv WHERE cf = sq.cf AND k = sq.k), 0); \
         INSERT INTO dsv_kv (cf, k, v) \
           SELECT a.cf, a.p || int8send(n + row_number() OVER (ORDER BY s.id, a.o)), a.v \
           FROM dsv_stage s, \
             unnest(s.s_cf, s.s_k, s.a_cf, s.a_p, s.a_v) WITH ORDINALITY AS a(scf, sk, cf, p, v, o) \
           WHERE s.id = ANY(ids) AND a.scf = sq.cf AND a.sk = sq.k; \
         GET DIAGNOSTICS cnt = ROW_COUNT; \
         n := n + cnt; \
         UPDATE dsv_kv SET v = dsv_le_bytes(n) WHERE cf = sq.cf AND k = sq.k; \
         IF NOT FOUND THEN \
           INSERT INTO dsv_kv (cf, k, v) VALUES (sq.cf, sq.k, dsv_le_bytes(n)); \
         END IF; \
       END LOOP; \
       INSERT INTO dsv_kv (cf, k, v) \
         SELECT meta, b.k, dsv_le_bytes(b.c) FROM \
           (SELECT u.k, count(*) AS c FROM dsv_stage s, unnest(s.bump) AS u(k) \
            WHERE s.id = ANY(ids) GROUP BY u.k) b \
         ON CONFLICT (cf, k) DO UPDATE SET v = dsv_le_bytes(dsv_le(dsv_kv.v) + dsv_le(EXCLUDED.v)); \
       DELETE FROM dsv_stage WHERE id = ANY(ids); \
       PERFORM pg_notify('dsv_changes', ''); \
       RETURN cardinality(ids); \
     END $f$;",
    // 4: the commit function and the sequencer plan their statements once
    // per connection (`plan_cache_mode = force_generic_plan`). With custom
    // plans, PostgreSQL planned every statement that reads an array
    // argument again at every call (a custom plan, which knows the array's
    // length, is always estimated cheaper than the generic one): that
    // planning was most of a commit's time. A commit deletes its keys one
    // by one by primary key (the generic plan of the join with the key
    // array scans the whole table), unless it deletes more than 64.
    "CREATE OR REPLACE FUNCTION dsv_commit( \
         lk bigint[], lx boolean[], \
         e_cf smallint[], e_k bytea[], e_v bytea[], app smallint, lock_k bytea[], \
         p_cf smallint[], p_k bytea[], p_v bytea[], d_cf smallint[], d_k bytea[], \
         s_cf smallint[], s_k bytea[], s_lk bigint[], a_cf smallint[], a_p bytea[], a_v bytea[], \
         bump bytea[], bump_lk bigint[], meta smallint) RETURNS void LANGUAGE plpgsql \
       SET plan_cache_mode = force_generic_plan AS $f$ \
     DECLARE \
       bad_k bytea; key bytea; \
     BEGIN \
       PERFORM pg_advisory_xact_lock_shared(28274449916064361); \
       FOR i IN 1 .. coalesce(cardinality(lk), 0) LOOP \
         IF lx[i] THEN \
           PERFORM pg_advisory_xact_lock((lk[i] >> 32)::int, (lk[i] & 2147483647)::int); \
         ELSE \
           PERFORM pg_advisory_xact_lock_shared((lk[i] >> 32)::int, (lk[i] & 2147483647)::int); \
         END IF; \
       END LOOP; \
       IF cardinality(e_k) > 0 THEN \
       SELECT e.k INTO bad_k FROM unnest(e_cf, e_k, e_v) AS e(cf, k, v) \
         WHERE (SELECT kv.v FROM dsv_kv kv WHERE kv.cf = e.cf AND kv.k = e.k) \
               IS DISTINCT FROM e.v LIMIT 1; \
       END IF; \
       IF bad_k IS NOT NULL THEN \
         RAISE EXCEPTION USING ERRCODE = '40001', \
           MESSAGE = 'a key read by this transaction changed: ' || encode(bad_k, 'escape'); \
       END IF; \
       FOREACH key IN ARRAY lock_k LOOP \
         PERFORM 1 FROM dsv_kv WHERE cf = app AND k = key FOR UPDATE SKIP LOCKED; \
         IF NOT FOUND AND EXISTS (SELECT 1 FROM dsv_kv WHERE cf = app AND k = key) THEN \
           RAISE EXCEPTION USING ERRCODE = '40001', \
             MESSAGE = 'a row another agent is claiming: ' || encode(key, 'escape'); \
         END IF; \
       END LOOP; \
       IF cardinality(d_k) > 64 THEN \
         DELETE FROM dsv_kv USING unnest(d_cf, d_k) AS d(cf, k) \
           WHERE dsv_kv.cf = d.cf AND dsv_kv.k = d.k; \
       ELSE \
         FOR i IN 1 .. coalesce(cardinality(d_k), 0) LOOP \
           DELETE FROM dsv_kv WHERE cf = d_cf[i] AND k = d_k[i]; \
         END LOOP; \
       END IF; \
       INSERT INTO dsv_kv (cf, k, v) SELECT * FROM unnest(p_cf, p_k, p_v) \
         ON CONFLICT (cf, k) DO UPDATE SET v = EXCLUDED.v; \
       IF cardinality(a_v) > 0 OR cardinality(bump) > 0 THEN \
         INSERT INTO dsv_stage (s_cf, s_k, s_lk, a_cf, a_p, a_v, bump, bump_lk) \
           VALUES (s_cf, s_k, s_lk, a_cf, a_p, a_v, bump, bump_lk); \
         IF pg_try_advisory_xact_lock(28274449915798897) THEN \
           PERFORM dsv_number(meta); \
         END IF; \
       END IF; \
     END $f$; \
     ALTER FUNCTION dsv_number(smallint) SET plan_cache_mode = force_generic_plan;",
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
        // A current-thread runtime: the caller's own thread drives its
        // query and the connection's I/O in one `block_on`, with no hand-off
        // to a worker thread per round trip. Nothing runs between calls, so
        // an idle connection's events are taken in by `settle` before it is
        // trusted again.
        let rt = tokio::runtime::Builder::new_current_thread()
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
            clock: Mutex::new((0, 0)),
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
    /// The transaction's `BEGIN …`, until sent: it goes out pipelined with
    /// the transaction's first statement (one round trip for both).
    begin: Mutex<Option<String>>,
    /// A read failed on a serialization failure: whatever the body made of
    /// that error, the transaction is a conflict (and retried).
    conflicted: std::sync::atomic::AtomicBool,
}

impl<'a> TxnReader<'a> {
    fn new(shared: &'a Shared, client: &'a Conn, begin: Option<String>) -> Self {
        TxnReader {
            shared,
            client,
            begin: Mutex::new(begin),
            conflicted: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Whether `BEGIN` went out.
    fn sent(&self) -> bool {
        self.begin.lock().map(|b| b.is_none()).unwrap_or(true)
    }

    /// Runs `then` after the pending `BEGIN` (if not sent yet), in one
    /// round trip: both requests are queued before either answer is read.
    async fn begun<T>(
        &self,
        then: impl std::future::Future<Output = std::result::Result<T, tokio_postgres::Error>>,
    ) -> Result<std::result::Result<T, tokio_postgres::Error>> {
        let begin = self.begin.lock().ok().and_then(|mut b| b.take());
        let (b, r) = futures::join!(
            async {
                match &begin {
                    Some(sql) => self.client.batch_execute(sql).await,
                    None => Ok(()),
                }
            },
            then
        );
        b.map_err(|e| self.note(map_err(&self.shared.at, "begin", e)))?;
        Ok(r)
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
                .begun(self.client.query(&stmt, params))
                .await?
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
/// server restarted, or ended a transaction idle for [`VIEW_IDLE_MS`])
/// starts a new snapshot on the next read instead of failing — also in
/// the middle of a scan, which goes on after its last key: a long-lived
/// reader (a mount) recovers by itself.
struct PgView {
    shared: Arc<Shared>,
    conn: std::sync::RwLock<Option<Arc<Conn>>>,
}

/// A view unused for this long ends (the server closes its connection);
/// its next read starts a new snapshot. An open snapshot keeps the server
/// from cleaning up row versions that committed after it — the hot rows
/// every commit updates (counters) would grow chains of dead versions that
/// every later read walks.
const VIEW_IDLE_MS: u64 = 10_000;

/// A connection in a new read-only snapshot.
fn snapshot(shared: &Shared) -> Result<Conn> {
    let c = shared.checkout()?;
    // The snapshot is taken by the first statement after BEGIN.
    exec(
        shared,
        &c,
        &format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; \
             SET LOCAL idle_in_transaction_session_timeout = {VIEW_IDLE_MS}; SELECT 1"
        ),
        "begin a snapshot",
    )?;
    Ok(c)
}

impl PgView {
    fn conn(&self) -> Result<Arc<Conn>> {
        if let Some(c) = self.conn.read().map_err(|_| poisoned())?.as_ref() {
            self.shared.settle();
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

/// Times a view goes on after the server ended its connection within one
/// read (a scan's visitor idle past [`VIEW_IDLE_MS`] between two pages).
const VIEW_RESUMES: usize = 3;

impl PgView {
    /// Runs `read` on the view's connection; when the server ended the
    /// connection under it (and not the visitor failing), runs it again on
    /// a new snapshot, `read` being told where to go on from.
    fn resuming(
        &self,
        read: &mut dyn FnMut(&TxnReader<'_>, &mut bool) -> Result<()>,
    ) -> Result<()> {
        let mut tries = 0;
        loop {
            let c = self.conn()?;
            let mut visitor_failed = false;
            match read(&TxnReader::new(&self.shared, &c, None), &mut visitor_failed) {
                Err(Error::Unavailable(m))
                    if !visitor_failed && tries < VIEW_RESUMES && self.shared.lost(&c) =>
                {
                    tries += 1;
                    tracing::debug!("{m}; the read goes on on a new snapshot");
                }
                r => return r,
            }
        }
    }
}

impl KvRead for PgView {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let mut out = None;
        self.resuming(&mut |r, _| {
            out = r.get(cf, key)?;
            Ok(())
        })?;
        Ok(out)
    }
    fn scan_from(
        &self,
        cf: Cf,
        prefix: &[u8],
        start: &[u8],
        visit: &mut Visitor<'_>,
    ) -> Result<()> {
        let mut from = start.to_vec();
        self.resuming(&mut |r, failed| {
            r.scan_from(cf, prefix, &from.clone(), &mut |k, v| {
                // Goes on after the last key visited.
                from = [k, &[0]].concat();
                visit(k, v).inspect_err(|_| *failed = true)
            })
        })
    }
    fn scan_rev(
        &self,
        cf: Cf,
        prefix: &[u8],
        before: &[u8],
        visit: &mut Visitor<'_>,
    ) -> Result<()> {
        let mut before = before.to_vec();
        self.resuming(&mut |r, failed| {
            r.scan_rev(cf, prefix, &before.clone(), &mut |k, v| {
                before = k.to_vec();
                visit(k, v).inspect_err(|_| *failed = true)
            })
        })
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
            // Resolved by `seal` before.
            Op::Append { .. } => None,
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

/// Key of the advisory lock every commit takes shared (and the sequencer
/// too); taken exclusively by a writer that checks scans or that
/// conflicted (released at commit).
const WRITE_LOCK: i64 = 0x0064_7376_5f77_7269;

/// The most keys a commit locks one by one (more: it takes the write lock
/// exclusively).
const KEY_LOCKS_MAX: usize = 32;

/// Key of the advisory lock the sequencer (`dsv_sequence`) holds while it
/// numbers the staged appends (tried, never waited for).
#[cfg_attr(not(test), allow(dead_code))]
const SEQ_LOCK: i64 = 0x0064_7376_5f73_6571;

/// The per-key advisory lock of `(cf, key)` (64-bit FNV-1a; the server
/// splits it into the two-integer lock space, apart from the one-integer
/// locks above). A collision only makes two commits wait for each other.
fn key_lock(cf: i16, key: &[u8]) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in cf.to_be_bytes().iter().chain(key) {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h as i64
}

/// A point read to check at commit: column family, key, the value read.
type Expected = (i16, Vec<u8>, Option<Vec<u8>>);

/// A commit's arguments to `dsv_commit` (see the migration).
struct Commit {
    /// Too many keys for a lock each: the commit takes the write lock
    /// exclusively instead (and no key locks).
    exclusive: bool,
    /// Key locks, sorted, and whether each is exclusive.
    lk: Vec<i64>,
    lx: Vec<bool>,
    e_cf: Vec<i16>,
    e_k: Vec<Vec<u8>>,
    e_v: Vec<Option<Vec<u8>>>,
    lock_k: Vec<Vec<u8>>,
    p_cf: Vec<i16>,
    p_k: Vec<Vec<u8>>,
    p_v: Vec<Vec<u8>>,
    d_cf: Vec<i16>,
    d_k: Vec<Vec<u8>>,
    s_cf: Vec<i16>,
    s_k: Vec<Vec<u8>>,
    s_lk: Vec<i64>,
    a_cf: Vec<i16>,
    a_p: Vec<Vec<u8>>,
    a_v: Vec<Vec<u8>>,
    bump: Vec<Vec<u8>>,
    bump_lk: Vec<i64>,
    app: i16,
    meta: i16,
}

impl Commit {
    /// `expect`: the point reads to check; `claimed`: rows this
    /// transaction holds already.
    fn new(mut batch: Batch, expect: &[Expected], claimed: &[(Vec<u8>, Vec<u8>)]) -> Self {
        // The keyspaces this commit touches (appends included).
        let bump: Vec<Vec<u8>> = dsv_store::txn::counters_of(&batch)
            .into_iter()
            .filter(|(cf, k)| *cf == Cf::Meta && k.starts_with(dsv_store::txn::KEYSPACE_PREFIX))
            .map(|(_, k)| k)
            .collect();
        // Appends to a sequence the batch numbers itself (its body read
        // the counter, which is checked) follow that number here; the
        // others are numbered by the server.
        let own: Vec<(Cf, Vec<u8>)> = batch
            .ops
            .iter()
            .filter_map(|op| match op {
                Op::Put(cf, k, _) => Some((*cf, k.clone())),
                _ => None,
            })
            .collect();
        let mut local = Batch::default();
        let meta = cf_code(Cf::Meta);
        let bump_lk = bump.iter().map(|k| key_lock(meta, k)).collect();
        let mut c = Commit {
            exclusive: false,
            lk: Vec::new(),
            lx: Vec::new(),
            e_cf: Vec::new(),
            e_k: Vec::new(),
            e_v: Vec::new(),
            lock_k: Vec::new(),
            p_cf: Vec::new(),
            p_k: Vec::new(),
            p_v: Vec::new(),
            d_cf: Vec::new(),
            d_k: Vec::new(),
            s_cf: Vec::new(),
            s_k: Vec::new(),
            s_lk: Vec::new(),
            a_cf: Vec::new(),
            a_p: Vec::new(),
            a_v: Vec::new(),
            bump,
            bump_lk,
            app: cf_code(Cf::App),
            meta,
        };
        for op in std::mem::take(&mut batch.ops) {
            match op {
                Op::Append {
                    seq,
                    cf,
                    prefix,
                    value,
                } if !own.contains(&seq) => {
                    c.s_cf.push(cf_code(seq.0));
                    c.s_lk.push(key_lock(cf_code(seq.0), &seq.1));
                    c.s_k.push(seq.1);
                    c.a_cf.push(cf_code(cf));
                    c.a_p.push(prefix);
                    c.a_v.push(value);
                }
                other => local.ops.push(other),
            }
        }
        // Only appends to the batch's own sequences are left: numbered
        // after the value it puts.
        let _ = dsv_store::txn::resolve_appends(&mut local, &mut |_, _| Ok(0));
        let (puts, dels) = coalesce(local);
        for (cf, k, v) in expect {
            c.e_cf.push(*cf);
            c.e_k.push(k.clone());
            c.e_v.push(v.clone());
        }
        let mut locks: Vec<Vec<u8>> = puts
            .iter()
            .filter(|p| p.0 == c.app)
            .map(|p| p.1.clone())
            .chain(dels.iter().filter(|d| d.0 == c.app).map(|d| d.1.clone()))
            .filter(|k| !claimed.iter().any(|(f, _)| f == k))
            .collect();
        locks.sort();
        locks.dedup();
        c.lock_k = locks;
        for (cf, k, v) in puts {
            c.p_cf.push(cf);
            c.p_k.push(k);
            c.p_v.push(v);
        }
        for (cf, k) in dels {
            // The server numbers appends after the committed counter, as
            // `seal` does; deleting it first would restart the numbering.
            if c.s_cf
                .iter()
                .zip(&c.s_k)
                .any(|(sc, sk)| *sc == cf && *sk == k)
            {
                continue;
            }
            c.d_cf.push(cf);
            c.d_k.push(k);
        }
        // Every key written locked exclusively, every key read shared; in
        // one global order (no two commits wait for each other in a cycle).
        let mut locks: std::collections::BTreeMap<i64, bool> = Default::default();
        for (cf, k) in c.p_cf.iter().zip(&c.p_k).chain(c.d_cf.iter().zip(&c.d_k)) {
            locks.insert(key_lock(*cf, k), true);
        }
        for (cf, k) in c.e_cf.iter().zip(&c.e_k) {
            locks.entry(key_lock(*cf, k)).or_insert(false);
        }
        if locks.len() > KEY_LOCKS_MAX {
            // PostgreSQL's lock table is small (64 per connection by
            // default): a large commit (a version of many files) serializes
            // instead.
            c.exclusive = true;
        } else {
            for (l, x) in locks {
                c.lk.push(l);
                c.lx.push(x);
            }
        }
        c
    }

    fn params(&self) -> [&(dyn ToSql + Sync); 21] {
        [
            &self.lk,
            &self.lx,
            &self.e_cf,
            &self.e_k,
            &self.e_v,
            &self.app,
            &self.lock_k,
            &self.p_cf,
            &self.p_k,
            &self.p_v,
            &self.d_cf,
            &self.d_k,
            &self.s_cf,
            &self.s_k,
            &self.s_lk,
            &self.a_cf,
            &self.a_p,
            &self.a_v,
            &self.bump,
            &self.bump_lk,
            &self.meta,
        ]
    }
}

/// Whether a failed commit is a conflict (a checked read changed, or a row
/// a claimer holds), described for the error.
fn commit_conflict(e: &tokio_postgres::Error) -> Option<String> {
    use tokio_postgres::error::SqlState;
    let db = e.as_db_error()?;
    // Raised by the commit function itself (a changed read, a row a
    // claimer holds): by code, whatever the server's language.
    (*db.code() == SqlState::T_R_SERIALIZATION_FAILURE
        || *db.code() == SqlState::T_R_DEADLOCK_DETECTED)
        .then(|| db.message().to_string())
}

/// How one attempt runs its body.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Without the write lock; reads recorded, validated under the lock
    /// at commit.
    Optimistic,
    /// Under the write lock from the start: nobody else commits meanwhile,
    /// so the reads need no validation (after a conflict: a contended
    /// writer queues instead of repeating work that will fail).
    Locked,
}

impl PgKv {
    /// One attempt of a transaction (`prefixes` empty) or a claim. Runs at
    /// `READ COMMITTED`; the claimed rows are taken with `FOR UPDATE SKIP
    /// LOCKED`; the commit happens under [`WRITE_LOCK`], where the reads
    /// are checked again (optimistic mode), the appends numbered and the
    /// keyspace counters bumped — all writers commit one at a time, but
    /// only for the few round trips of the commit, not for their bodies.
    fn attempt(&self, prefixes: &[Vec<u8>], body: &mut ClaimBody<'_>, mode: Mode) -> Result<()> {
        let shared = &*self.shared;
        let at = &shared.at;
        let c = shared.checkout()?;
        let mut begin = format!(
            "BEGIN ISOLATION LEVEL READ COMMITTED; SET LOCAL lock_timeout = {}",
            shared.lock_timeout_ms
        );
        if mode == Mode::Locked {
            begin.push_str(&format!("; SELECT pg_advisory_xact_lock({WRITE_LOCK})"));
        }
        // BEGIN goes out with the first statement (a failed one — the lock
        // timed out — ends in the ROLLBACK below).
        let reader = TxnReader::new(shared, &c, Some(begin));
        let mut found: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        if !prefixes.is_empty() {
            let claimed = shared.rt.block_on(async {
                let stmt = c
                    .stmt(
                        "SELECT k, v FROM dsv_kv WHERE cf = $1 AND k >= $2 AND k < $3 \
                         ORDER BY k LIMIT 1 FOR UPDATE SKIP LOCKED",
                    )
                    .await
                    .map_err(|e| map_err(at, "prepare", e))?;
                let code = cf_code(Cf::App);
                let mut bounds = Vec::new();
                for p in prefixes {
                    let upper = prefix_successor(p).ok_or_else(|| {
                        Error::Invalid("a claim prefix of 0xff bytes only".into())
                    })?;
                    bounds.push((p.clone(), upper));
                }
                // Pipelined: one round trip for every prefix.
                let params: Vec<[&(dyn ToSql + Sync); 3]> = bounds
                    .iter()
                    .map(|(p, u)| [&code as &(dyn ToSql + Sync), p, u])
                    .collect();
                let rows = reader
                    .begun(futures::future::try_join_all(
                        params.iter().map(|ps| c.query_opt(&stmt, ps)),
                    ))
                    .await?
                    .map_err(|e| map_err(at, "claim", e))?;
                Ok::<_, Error>(
                    rows.into_iter()
                        .flatten()
                        .map(|r| (r.get::<_, Vec<u8>>(0), r.get::<_, Vec<u8>>(1)))
                        .collect::<Vec<_>>(),
                )
            });
            match claimed {
                Ok(f) => found = f,
                Err(e) => {
                    drop(reader);
                    drop(c);
                    return Err(e);
                }
            }
        }
        let recording = dsv_store::txn::Recording::new(&reader);
        let result = match mode {
            Mode::Optimistic => body(&recording, &found),
            Mode::Locked => body(&reader, &found),
        };
        let reads = recording.into_reads();
        // Takes the write lock (reentrant: the commit function takes it
        // again) and checks `reads` against the committed state under it.
        let check_locked = |reads: &[dsv_store::txn::ReadRecord]| -> Result<()> {
            shared.rt.block_on(async {
                let stmt = c
                    .stmt("SELECT pg_advisory_xact_lock($1)")
                    .await
                    .map_err(|e| map_err(at, "prepare", e))?;
                reader
                    .begun(c.execute(&stmt, &[&WRITE_LOCK]))
                    .await?
                    .map_err(|e| map_err(at, "take the write lock", e))
            })?;
            match dsv_store::txn::first_conflict(reads, &reader)? {
                Some(what) => Err(Error::Conflict { what, tries: 1 }),
                None => Ok(()),
            }
        };
        let outcome = (|| -> Result<bool> {
            let optimistic = mode == Mode::Optimistic;
            let batch = match result {
                Ok(b) if b.is_empty() => {
                    // Nothing to write, but the caller gets what the body
                    // made of its reads (each statement saw the latest
                    // commits): they must hold together, as for a write.
                    if optimistic && !reads.is_empty() {
                        check_locked(&reads)?;
                    }
                    return Ok(false);
                }
                Ok(b) => b,
                Err(e) => {
                    // An error may come from reads that no longer hold:
                    // then it is a conflict, and the body runs again.
                    if optimistic {
                        check_locked(&reads)?;
                    }
                    return Err(e);
                }
            };
            let mut expect = Vec::new();
            let mut scans = Vec::new();
            if optimistic {
                for r in reads {
                    match r {
                        dsv_store::txn::ReadRecord::Get { cf, key, value } => {
                            expect.push((cf_code(cf), key, value))
                        }
                        scan => scans.push(scan),
                    }
                }
            }
            // Scans are checked by the client, under the write lock taken
            // exclusively; point reads by the commit function, under key
            // locks (or under the write lock: a commit of many keys, or
            // after a conflict).
            let commit = Commit::new(batch, &expect, &found);
            if optimistic && (!scans.is_empty() || commit.exclusive) {
                check_locked(&scans)?;
            }
            shared.rt.block_on(async {
                let stmt = c
                    .stmt(
                        "SELECT dsv_commit($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, \
                         $13, $14, $15, $16, $17, $18, $19, $20, $21)",
                    )
                    .await
                    .map_err(|e| map_err(at, "prepare", e))?;
                let seq = c
                    .stmt(SEQUENCE_SQL)
                    .await
                    .map_err(|e| map_err(at, "prepare", e))?;
                let params = commit.params();
                // One round trip: the commit function (key locks, the
                // reads checked, claimed rows locked, the writes, the
                // appends and counter bumps staged), COMMIT (a failed
                // function turns it into a rollback), and the sequencer.
                let (f, end, sequenced) = reader
                    .begun(async {
                        Ok::<_, tokio_postgres::Error>(futures::join!(
                            c.execute(&stmt, &params),
                            c.batch_execute("COMMIT"),
                            c.sequence(&seq)
                        ))
                    })
                    .await?
                    .map_err(|e| map_err(at, "commit", e))?;
                if let Err(e) = &f {
                    if let Some(what) = commit_conflict(e) {
                        return Err(Error::Conflict { what, tries: 1 });
                    }
                }
                f.map_err(|e| map_err(at, "commit", e))?;
                end.map_err(|e| map_err(at, "commit", e))?;
                // Committed. A sequencer that numbered something runs again
                // after its own commit: a writer that committed meanwhile
                // found it busy and left its staging to it.
                if let Err(e) = c.sequence_after(&seq, sequenced).await {
                    tracing::warn!(
                        "{at}: the commit is in, but numbering its events failed \
                         (the next writer numbers them): {e}"
                    );
                }
                Ok::<_, Error>(())
            })?;
            Ok(true)
        })();
        let conflicted = reader.conflicted();
        let begun = reader.sent();
        drop(reader);
        match &outcome {
            // Committed in the pipeline above.
            Ok(true) => shared.give_back(c),
            // Nothing was sent: no transaction to end.
            Ok(false) | Err(_) if !begun => shared.give_back(c),
            Ok(false) | Err(_) => {
                // Nothing to commit, or it failed before or inside the
                // commit's pipeline: roll back (a no-op when the server
                // already ended the transaction). A connection whose
                // rollback fails is not reused.
                if exec(shared, &c, "ROLLBACK", "roll back").is_ok() {
                    shared.give_back(c);
                }
            }
        }
        match outcome {
            Ok(_) => Ok(()),
            // A read hit a deadlock that the body turned into another
            // error (or swallowed): the transaction conflicted.
            Err(e) if conflicted && !matches!(e, Error::Conflict { .. }) => Err(Error::Conflict {
                what: format!("a concurrent transaction (then: {e})"),
                tries: 1,
            }),
            Err(e) => Err(e),
        }
    }

    /// Runs one transaction or claim: optimistic while writers rarely
    /// collide; under the write lock at once for a while after a conflict.
    fn run(&self, prefixes: &[Vec<u8>], body: &mut ClaimBody<'_>) -> Result<()> {
        let now = dsv_store::store::now_ms();
        let contended = now
            - self
                .last_conflict_ms
                .load(std::sync::atomic::Ordering::Relaxed)
            < CONTENDED_FOR_MS;
        if !contended {
            match self.attempt(prefixes, body, Mode::Optimistic) {
                Err(Error::Conflict { .. }) => self
                    .last_conflict_ms
                    .store(now, std::sync::atomic::Ordering::Relaxed),
                other => return other,
            }
        }
        let mut last = None;
        for try_no in 0..LOCKED_TRIES {
            if try_no > 0 {
                std::thread::sleep(dsv_store::txn::conflict_backoff(try_no as u32));
            }
            match self.attempt(prefixes, body, Mode::Locked) {
                // Still possible behind the lock: a row a claimer holds
                // (taken without waiting), a deadlock.
                Err(e @ Error::Conflict { .. }) => last = Some(e),
                other => return other,
            }
        }
        Err(last.expect("LOCKED_TRIES > 0"))
    }
}

/// How many times in a row one writer runs the sequencer while each run
/// finds staged work (another writer, or the change feed's sweep, takes
/// over after).
const SEQUENCER_PASSES: usize = 64;

/// Attempts of one transaction inside [`Backend::transact`] behind the
/// write lock (after an optimistic one, unless contended).
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
        self.run(&[], &mut |kv, _| body(kv))
    }

    fn claim(&self, prefixes: &[Vec<u8>], body: &mut ClaimBody<'_>) -> Result<()> {
        self.run(prefixes, body)
    }

    /// `FOR UPDATE SKIP LOCKED`, outside the write lock; an empty claim
    /// is one round trip.
    fn claims_concurrently(&self) -> bool {
        true
    }

    /// Measured with one query (the server's `clock_timestamp()` against
    /// the midpoint of the round trip), again after [`CLOCK_TTL_MS`]. A
    /// failed measurement keeps the last offset (0 at first): the caller's
    /// next database call reports the outage.
    fn clock_offset_ms(&self) -> i64 {
        let now = dsv_store::store::now_ms();
        let Ok(mut clock) = self.clock.lock() else {
            return 0;
        };
        if clock.1 != 0 && now - clock.1 < CLOCK_TTL_MS {
            return clock.0;
        }
        let measured = self.shared.checkout().and_then(|c| {
            let r = self.shared.rt.block_on(async {
                let t0 = dsv_store::store::now_ms();
                let row = c
                    .query_one(
                        "SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint",
                        &[],
                    )
                    .await
                    .map_err(|e| map_err(&self.shared.at, "read the clock", e))?;
                let t1 = dsv_store::store::now_ms();
                let server: i64 = row.get(0);
                Ok::<i64, Error>(server - (t0 + t1) / 2)
            });
            self.shared.give_back(c);
            r
        });
        match measured {
            Ok(offset) => {
                if offset.abs() > 1_000 {
                    tracing::warn!(
                        "{}: this machine's clock is {} ms {} the database's; \
                         leases and heartbeats use the database's",
                        self.shared.at,
                        offset.abs(),
                        if offset > 0 { "behind" } else { "ahead of" }
                    );
                }
                *clock = (offset, now);
                offset
            }
            Err(e) => {
                tracing::debug!("{e}");
                clock.0
            }
        }
    }

    fn change_source(&self) -> Result<Box<dyn ChangeSource>> {
        let signal = Arc::new((Mutex::new(0u64), Condvar::new()));
        let config = self.shared.config.clone();
        let at = self.shared.at.clone();
        // The first connection is made here so that an unreachable
        // database is an error now; later losses reconnect with backoff.
        // Its own runtime with a worker: notifications must be taken in
        // while no query runs.
        let feed_rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("dsv-pg-feed")
            .enable_all()
            .build()
            .map_err(|e| Error::Kv(format!("cannot start the change feed's runtime: {e}")))?;
        let first = feed_rt.block_on(Shared::connect_once(&config, &at))?;
        let s = signal.clone();
        let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
        feed_rt.spawn(async move {
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
            _rt: feed_rt,
            signal,
            seen,
            shared: self.shared.clone(),
        }))
    }
}

use dsv_store::txn::ChangeSource;

/// Wake-ups from `LISTEN dsv_changes` (a task on the backend's runtime
/// holds the connection and reconnects it; dropping this stops it).
struct PgChanges {
    _stop: tokio::sync::oneshot::Sender<()>,
    /// Its own runtime, whose worker keeps the connection polled between
    /// calls (dropped after `_stop`, which ends the task).
    _rt: tokio::runtime::Runtime,
    signal: Arc<(Mutex<u64>, Condvar)>,
    seen: u64,
    shared: Arc<Shared>,
}

impl ChangeSource for PgChanges {
    fn wait(&mut self, timeout: Duration) -> Result<()> {
        let (n, cv) = &*self.signal;
        let n = n.lock().map_err(|_| poisoned())?;
        let (n, timed_out) = cv
            .wait_timeout_while(n, timeout, |n| *n == self.seen)
            .map_err(|_| poisoned())?;
        self.seen = *n;
        if timed_out.timed_out() {
            drop(n);
            // Nothing was notified: staged work a writer left (it died
            // between its COMMIT and the sequencer) is numbered now.
            self.sweep();
        }
        Ok(())
    }
}

impl PgChanges {
    fn sweep(&self) {
        let Ok(c) = self.shared.checkout() else {
            return;
        };
        let r = self.shared.rt.block_on(async {
            let seq = c.stmt(SEQUENCE_SQL).await?;
            let first = c.sequence(&seq).await;
            c.sequence_after(&seq, first).await
        });
        match r {
            Ok(()) => self.shared.give_back(c),
            Err(e) => tracing::debug!("change feed: the sweep failed: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_commit_function_takes_the_write_lock() {
        let lock = format!("pg_advisory_xact_lock({})", super::WRITE_LOCK);
        assert!(super::MIGRATIONS[1].contains(&lock));
        // Schema 3: commits and the sequencer take it shared; the
        // sequencer tries its own.
        let shared = format!("pg_advisory_xact_lock_shared({})", super::WRITE_LOCK);
        assert_eq!(super::MIGRATIONS[2].matches(&shared).count(), 2);
        let seq = format!("pg_try_advisory_xact_lock({})", super::SEQ_LOCK);
        assert_eq!(super::MIGRATIONS[2].matches(&seq).count(), 2);
        // Schema 4 replaces the commit function, locks unchanged.
        assert_eq!(super::MIGRATIONS[3].matches(&shared).count(), 1);
        assert_eq!(super::MIGRATIONS[3].matches(&seq).count(), 1);
        assert_eq!(
            super::MIGRATIONS[3]
                .matches("plan_cache_mode = force_generic_plan")
                .count(),
            2
        );
    }

    #[test]
    fn the_sequencer_call_names_the_meta_family() {
        let code = super::cf_code(dsv_store::kv::Cf::Meta);
        assert_eq!(
            super::SEQUENCE_SQL,
            format!("SELECT dsv_sequence({code}::smallint)")
        );
    }

    #[test]
    fn key_locks_are_stable_and_spread() {
        // The same key always maps to the same lock (two processes must
        // agree), different keys and families to different ones.
        assert_eq!(super::key_lock(8, b"tk/a"), super::key_lock(8, b"tk/a"));
        assert_ne!(super::key_lock(8, b"tk/a"), super::key_lock(8, b"tk/b"));
        assert_ne!(super::key_lock(8, b"tk/a"), super::key_lock(9, b"tk/a"));
        // FNV-1a 64 of [0, 8] · "tk/a", fixed: it is part of the schema.
        assert_eq!(super::key_lock(8, b"tk/a") as u64, {
            let mut h: u64 = 0xcbf2_9ce4_8422_2325;
            for b in [0u8, 8, b't', b'k', b'/', b'a'] {
                h ^= b as u64;
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
            h
        });
    }
}
