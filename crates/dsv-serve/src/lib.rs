//! # dsv-serve
//!
//! Serves the models of a dsv repository over HTTP (`dsv serve`), one
//! endpoint per model line (`PROJECT/NAME`):
//!
//! - **What is served**: the line's model tagged `production`, and the one
//!   tagged `canary` if any. Models are decoded once and held behind an
//!   `Arc`; when a tag moves (the change feed of the model keyspace wakes
//!   the watcher — no polling), the line's entry is replaced atomically.
//!   A request keeps the models it started with, so none fails during a
//!   swap.
//! - **Routing**: a canary gets a share of the traffic. The request's key
//!   (a header, or a field of the row) is hashed (BLAKE3) onto [0, 1); keys
//!   below the share go to the canary, so one key always sees one model and
//!   raising the share only moves keys toward the canary. Without a key a
//!   request is routed at random. In shadow mode production answers every
//!   request and the canary scores a copy.
//! - **Online evaluation**: every answer has a request id; `POST
//!   …/feedback` with the true labels scores the models that answered
//!   (accuracy, log loss). With enough labels on both sides, a one-sided
//!   two-proportion z-test promotes the canary (it becomes production) or
//!   rejects it (tag `rejected`) — a model event either way
//!   ([`dsv::Repo::decide_canary`]) — and a canary still undecided after
//!   the configured limit is rejected (production stays).
//! - **Operations**: `/healthz`, `/readyz`, Prometheus `/metrics`; body
//!   size, row and time limits; a bearer token (compared in constant time)
//!   when configured; errors are JSON naming the field or column at fault.
//!
//! The library reads no environment and prints nothing: the CLI passes the
//! options and the listener.

pub mod error;
pub mod gate;
pub mod input;
pub mod metrics;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use dsv::Repo;
use dsv_train::FittedModel;

pub use error::{ApiError, Error, Result};
use gate::{Online, Verdict};

/// How the canary is routed and judged.
#[derive(Debug, Clone)]
pub struct CanaryOptions {
    /// Share of keys routed to the canary, in [0, 1].
    pub share: f64,
    /// Request header carrying the sticky key.
    pub key_header: String,
    /// Row field carrying the sticky key (taken out of the row).
    pub key_field: Option<String>,
    /// The canary scores a copy of every request; production answers.
    pub shadow: bool,
    /// Labels each side needs before the gate decides.
    pub min_labeled: u64,
    /// One-sided confidence of the gate's test.
    pub confidence: f64,
    /// A canary undecided this long after this server first served it is
    /// rejected.
    pub max_duration: Option<Duration>,
    /// Whether this server records decisions (off: it only reports).
    pub decide: bool,
}

impl Default for CanaryOptions {
    fn default() -> Self {
        CanaryOptions {
            share: 0.1,
            key_header: "x-dsv-key".into(),
            key_field: None,
            shadow: false,
            min_labeled: 200,
            confidence: 0.95,
            max_duration: None,
            decide: true,
        }
    }
}

/// What `dsv serve` serves and how.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Lines (`PROJECT/NAME`) to serve; empty: every line with a
    /// `production` or `canary` model.
    pub lines: Vec<String>,
    /// Largest request body, bytes.
    pub max_body_bytes: usize,
    /// Most rows in one request.
    pub max_rows: usize,
    /// Longest a request may take to arrive and be answered.
    pub request_timeout: Duration,
    /// The bearer token every request but `/healthz` and `/readyz` needs.
    pub token: Option<String>,
    /// Answers remembered for feedback (oldest forgotten first; about 200
    /// bytes each for a one-row request).
    pub remember: usize,
    /// The canary.
    pub canary: CanaryOptions,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            lines: Vec::new(),
            max_body_bytes: 1 << 20,
            max_rows: 10_000,
            request_timeout: Duration::from_secs(10),
            token: None,
            remember: 50_000,
            canary: CanaryOptions::default(),
        }
    }
}

/// A decoded model.
struct Loaded {
    model: dsv::Model,
    fitted: FittedModel,
    /// Its id and classes, shared by every remembered answer.
    id: Arc<str>,
    classes: Arc<Vec<f64>>,
}

/// A line's models at one moment.
struct Line {
    /// Its name, shared by every remembered answer.
    name: Arc<str>,
    production: Option<Arc<Loaded>>,
    canary: Option<Arc<Loaded>>,
    /// Columns any of its models reads.
    known: Vec<String>,
    /// When this server first served the current canary.
    canary_since: Option<Instant>,
}

/// Which model answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The production model.
    Production,
    /// The canary.
    Canary,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::Production => "production",
            Role::Canary => "canary",
        }
    }
}

/// One model's answer to a remembered request (kept small: a server
/// remembers many).
struct Scored {
    model: Arc<str>,
    classes: Arc<Vec<f64>>,
    /// Per row: predicted class index and P(each class).
    rows: Vec<(u32, Box<[f32]>)>,
}

/// Remembered answers, for feedback.
#[derive(Default)]
struct Pending {
    by_id: HashMap<u128, (Arc<str>, Vec<Scored>)>,
    order: VecDeque<u128>,
}

/// The server's state, shared by the HTTP handlers and the watcher.
pub struct Server {
    repo: Arc<Repo>,
    opts: ServeOptions,
    lines: RwLock<Arc<BTreeMap<String, Arc<Line>>>>,
    metrics: metrics::Metrics,
    online: Mutex<HashMap<String, Online>>,
    pending: Mutex<Pending>,
    deciding: Mutex<HashSet<String>>,
    /// Feature columns of every model of a served line seen so far, by id.
    features: Mutex<HashMap<String, Vec<String>>>,
    ready: AtomicBool,
}

/// The line name of a model.
fn line_of(m: &dsv::Model) -> String {
    format!("{}/{}", m.project, m.name)
}

/// Where `key` falls on [0, 1) (BLAKE3, so every server agrees).
pub fn key_point(key: &str) -> f64 {
    let h = blake3::hash(key.as_bytes());
    let b: [u8; 8] = h.as_bytes()[..8].try_into().expect("8 bytes");
    (u64::from_be_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}

/// Constant-time comparison (length is not secret).
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Server {
    /// Opens the server on `repo` and loads what it serves.
    pub fn new(repo: Arc<Repo>, opts: ServeOptions) -> Result<Arc<Server>> {
        if !(0.0..=1.0).contains(&opts.canary.share) {
            return Err(Error::Options(format!(
                "the canary share {} is not between 0 and 1",
                opts.canary.share
            )));
        }
        if !(0.5..1.0).contains(&opts.canary.confidence) {
            return Err(Error::Options(format!(
                "the confidence {} is not in [0.5, 1)",
                opts.canary.confidence
            )));
        }
        for l in &opts.lines {
            dsv::rev::parse_dataset_name(l)?;
        }
        let s = Arc::new(Server {
            repo,
            opts,
            lines: RwLock::new(Arc::new(BTreeMap::new())),
            metrics: metrics::Metrics::default(),
            online: Mutex::new(HashMap::new()),
            pending: Mutex::new(Pending::default()),
            deciding: Mutex::new(HashSet::new()),
            features: Mutex::new(HashMap::new()),
            ready: AtomicBool::new(false),
        });
        s.refresh()?;
        s.ready.store(true, Ordering::Release);
        Ok(s)
    }

    fn snapshot(&self) -> Arc<BTreeMap<String, Arc<Line>>> {
        self.lines.read().map(|l| l.clone()).unwrap_or_default()
    }

    /// The lines served now: name, production model id, canary model id.
    pub fn served(&self) -> Vec<(String, Option<String>, Option<String>)> {
        self.snapshot()
            .iter()
            .map(|(n, l)| {
                (
                    n.clone(),
                    l.production.as_ref().map(|m| m.model.id.clone()),
                    l.canary.as_ref().map(|m| m.model.id.clone()),
                )
            })
            .collect()
    }

    /// Reads the tags again and swaps every line whose models changed
    /// (models already loaded are reused). Returns the lines that changed.
    pub fn refresh(&self) -> Result<Vec<String>> {
        self.repo.store().refresh().map_err(dsv::Error::from)?;
        let old = self.snapshot();
        let mut wanted: BTreeMap<String, (Option<dsv::Model>, Option<dsv::Model>)> =
            BTreeMap::new();
        for l in &self.opts.lines {
            wanted.entry(l.clone()).or_default();
        }
        for (tag, canary) in [("production", false), ("canary", true)] {
            for m in self.repo.models(Some(tag))? {
                let line = line_of(&m);
                if !self.opts.lines.is_empty() && !wanted.contains_key(&line) {
                    continue;
                }
                let slot = wanted.entry(line).or_default();
                let slot = if canary { &mut slot.1 } else { &mut slot.0 };
                // Newest first: the first one found holds the tag.
                if slot.is_none() {
                    *slot = Some(m);
                }
            }
        }
        let mut loaded: HashMap<String, Arc<Loaded>> = HashMap::new();
        for l in old.values() {
            for m in [&l.production, &l.canary].into_iter().flatten() {
                loaded.insert(m.model.id.clone(), m.clone());
            }
        }
        let mut next = BTreeMap::new();
        let mut changed = Vec::new();
        for (name, (prod, canary)) in wanted {
            let mut load = |m: Option<dsv::Model>| -> Result<Option<Arc<Loaded>>> {
                let Some(m) = m else { return Ok(None) };
                if let Some(l) = loaded.get(&m.id) {
                    return Ok(Some(l.clone()));
                }
                let body = self.repo.model_body(&m)?;
                let fitted: FittedModel =
                    serde_json::from_slice(&body).map_err(|e| Error::Model {
                        id: m.id.clone(),
                        message: e.to_string(),
                    })?;
                let l = Arc::new(Loaded {
                    id: Arc::from(m.id.as_str()),
                    classes: Arc::new(fitted.classes.clone()),
                    model: m,
                    fitted,
                });
                loaded.insert(l.model.id.clone(), l.clone());
                Ok(Some(l))
            };
            let production = load(prod)?;
            let canary = load(canary)?;
            let ids = |p: &Option<Arc<Loaded>>| p.as_ref().map(|m| m.model.id.clone());
            let before = old.get(&name);
            let same = before.is_some_and(|b| {
                ids(&b.production) == ids(&production) && ids(&b.canary) == ids(&canary)
            });
            if same {
                next.insert(name, before.expect("checked").clone());
                continue;
            }
            let known = self.line_columns(&name, [&production, &canary])?;
            let canary_since = match (before, &canary) {
                (Some(b), Some(c)) if ids(&b.canary).as_deref() == Some(c.model.id.as_str()) => {
                    b.canary_since
                }
                (_, Some(_)) => Some(Instant::now()),
                _ => None,
            };
            if before.is_some() {
                self.metrics.swap(&name);
            }
            tracing::info!(
                "{name}: production {}, canary {}",
                ids(&production)
                    .as_deref()
                    .map_or("none", |s| &s[..12.min(s.len())]),
                ids(&canary)
                    .as_deref()
                    .map_or("none", |s| &s[..12.min(s.len())])
            );
            changed.push(name.clone());
            next.insert(
                name.clone(),
                Arc::new(Line {
                    name: Arc::from(name.as_str()),
                    production,
                    canary,
                    known,
                    canary_since,
                }),
            );
        }
        if let Ok(mut l) = self.lines.write() {
            *l = Arc::new(next);
        }
        Ok(changed)
    }

    /// The line's input columns: every feature any of its models reads
    /// (served or not). A request may carry any of them; a column no model
    /// of the line reads is refused by name.
    fn line_columns(&self, line: &str, served: [&Option<Arc<Loaded>>; 2]) -> Result<Vec<String>> {
        #[derive(serde::Deserialize)]
        struct Features {
            features: Vec<String>,
        }
        let (project, name) = dsv::rev::parse_dataset_name(line)?;
        let mut cache = self
            .features
            .lock()
            .map_err(|_| Error::Options("a poisoned lock".into()))?;
        for m in served.into_iter().flatten() {
            cache
                .entry(m.model.id.clone())
                .or_insert_with(|| m.fitted.features.clone());
        }
        let mut known: Vec<String> = Vec::new();
        for m in self.repo.models_in(Some(&project), None)? {
            if m.name != name {
                continue;
            }
            if !cache.contains_key(&m.id) {
                let body = self.repo.model_body(&m)?;
                let f: Features = serde_json::from_slice(&body).map_err(|e| Error::Model {
                    id: m.id.clone(),
                    message: e.to_string(),
                })?;
                cache.insert(m.id.clone(), f.features);
            }
            for f in &cache[&m.id] {
                if !known.contains(f) {
                    known.push(f.clone());
                }
            }
        }
        Ok(known)
    }

    /// Follows the repository's model tags until `stop` is set: wakes on
    /// the change feed of the model keyspace and swaps what changed; every
    /// second also rejects canaries past their time limit.
    pub fn watch(self: &Arc<Self>, stop: Arc<AtomicBool>) -> Result<std::thread::JoinHandle<()>> {
        let s = self.clone();
        // Subscribed before returning: a tag moved after this call is seen.
        let (tx, rx) = std::sync::mpsc::channel::<Result<()>>();
        let h = std::thread::Builder::new()
            .name("dsv-serve-watch".into())
            .spawn(move || {
                let keyspaces = [dsv_store::txn::app_keyspace(dsv::keys::MODEL)];
                let mut wake = match dsv_runtime::Wake::new(&s.repo, &keyspaces) {
                    Ok(w) => {
                        let _ = tx.send(Ok(()));
                        w
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e.into()));
                        return;
                    }
                };
                // Changes between the first load and the subscription.
                if let Err(e) = s.refresh() {
                    tracing::warn!("cannot reload the served models: {e}");
                }
                while !stop.load(Ordering::Acquire) {
                    wake.wait(Duration::from_secs(1));
                    if stop.load(Ordering::Acquire) {
                        break;
                    }
                    if let Err(e) = s.refresh() {
                        tracing::warn!("cannot reload the served models: {e}");
                    }
                    s.expire_canaries();
                }
            })
            .map_err(|e| Error::Io {
                what: "cannot start the model watcher".into(),
                source: e,
            })?;
        match rx.recv() {
            Ok(Ok(())) => Ok(h),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(Error::Options("the model watcher ended at start".into())),
        }
    }

    fn expire_canaries(&self) {
        let Some(max) = self.opts.canary.max_duration else {
            return;
        };
        if !self.opts.canary.decide {
            return;
        }
        for (name, l) in self.snapshot().iter() {
            let (Some(c), Some(since)) = (&l.canary, l.canary_since) else {
                continue;
            };
            if since.elapsed() < max {
                continue;
            }
            let reason = format!(
                "still undecided after {} s (the limit): production stays",
                max.as_secs()
            );
            self.decide(name, l, c, Verdict::Reject(reason));
        }
    }

    /// Records a verdict (once per canary), then reloads.
    fn decide(&self, name: &str, l: &Line, c: &Arc<Loaded>, v: Verdict) {
        let (verdict, reason) = match v {
            Verdict::Undecided => return,
            Verdict::Promote(r) => (dsv::CanaryVerdict::Promote, r),
            Verdict::Reject(r) => (dsv::CanaryVerdict::Reject, r),
        };
        match self.deciding.lock() {
            Ok(mut d) => {
                if !d.insert(c.model.id.clone()) {
                    return;
                }
            }
            Err(_) => return,
        }
        let prod = l
            .production
            .as_ref()
            .map(|p| p.model.id.clone())
            .unwrap_or_default();
        let online = {
            let on = self.online.lock().map(|o| o.clone()).unwrap_or_default();
            let get = |id: &str| on.get(id).copied().unwrap_or_default().json();
            serde_json::json!({
                "canary": get(&c.model.id),
                "production": get(&prod),
                "share": self.opts.canary.share,
                "shadow": self.opts.canary.shadow,
                "confidence": self.opts.canary.confidence,
            })
        };
        match self
            .repo
            .decide_canary(&c.model.id, &prod, verdict, &reason, online)
        {
            Ok(_) => tracing::info!("{name}: canary {} {verdict:?}: {reason}", c.model.id),
            Err(e) => {
                tracing::warn!("{name}: the decision on canary {} failed: {e}", c.model.id);
                if let Ok(mut d) = self.deciding.lock() {
                    d.remove(&c.model.id);
                }
                return;
            }
        }
        if let Err(e) = self.refresh() {
            tracing::warn!("cannot reload the served models: {e}");
        }
    }

    /// Online figures of every served model: (line, model, role, online).
    pub fn online(&self) -> Vec<(String, String, &'static str, Online)> {
        let on = self.online.lock().map(|o| o.clone()).unwrap_or_default();
        let mut out = Vec::new();
        for (name, l) in self.snapshot().iter() {
            for (m, role) in [(&l.production, Role::Production), (&l.canary, Role::Canary)] {
                if let Some(m) = m {
                    out.push((
                        name.clone(),
                        m.model.id.clone(),
                        role.as_str(),
                        on.get(&m.model.id).copied().unwrap_or_default(),
                    ));
                }
            }
        }
        out
    }

    /// The HTTP routes.
    pub fn router(self: &Arc<Self>) -> Router {
        let open = Router::new()
            .route(
                "/healthz",
                get(|| async { axum::Json(serde_json::json!({"status": "ok"})) }),
            )
            .route("/readyz", get(readyz));
        let guarded = Router::new()
            .route("/metrics", get(metrics_text))
            .route("/v1/models", get(list_lines))
            .route("/v1/models/{project}/{name}", get(show_line))
            .route("/v1/models/{project}/{name}/predict", post(predict))
            .route("/v1/models/{project}/{name}/feedback", post(feedback))
            .route_layer(axum::middleware::from_fn_with_state(
                self.clone(),
                authorize,
            ));
        open.merge(guarded)
            .fallback(|| async {
                (
                    StatusCode::NOT_FOUND,
                    axum::Json(serde_json::json!({"error": {"code": "not_found", "message": "no such endpoint (POST /v1/models/PROJECT/NAME/predict, …/feedback; GET /v1/models, /metrics, /healthz, /readyz)"}})),
                )
            })
            .with_state(self.clone())
    }

    fn remember(&self, line: &Arc<str>, scored: Vec<Scored>) -> u128 {
        let id: u128 = rand::random();
        if let Ok(mut p) = self.pending.lock() {
            while p.order.len() >= self.opts.remember.max(1) {
                if let Some(old) = p.order.pop_front() {
                    p.by_id.remove(&old);
                }
            }
            p.order.push_back(id);
            p.by_id.insert(id, (line.clone(), scored));
        }
        id
    }
}

/// Serves `server` on `listener` until `shutdown` completes; requests in
/// flight are finished first.
pub async fn serve(
    listener: tokio::net::TcpListener,
    server: Arc<Server>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    axum::serve(listener, server.router())
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|e| Error::Io {
            what: "the HTTP server failed".into(),
            source: e,
        })
}

async fn authorize(
    State(s): State<Arc<Server>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if let Some(token) = &s.opts.token {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !same_secret(given.trim().as_bytes(), token.as_bytes()) {
            s.metrics.error("", ApiError::Unauthorized.code());
            return ApiError::Unauthorized.into_response();
        }
    }
    next.run(req).await
}

async fn readyz(State(s): State<Arc<Server>>) -> Response {
    let lines = s.snapshot();
    let serving = lines
        .values()
        .filter(|l| l.production.is_some() || l.canary.is_some())
        .count();
    let ready = s.ready.load(Ordering::Acquire) && serving > 0;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        axum::Json(serde_json::json!({"ready": ready, "lines": serving})),
    )
        .into_response()
}

async fn metrics_text(State(s): State<Arc<Server>>) -> Response {
    let body = s.metrics.render(&s.online());
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        )],
        body,
    )
        .into_response()
}

fn line_json(s: &Server, name: &str, l: &Line) -> serde_json::Value {
    let on = s.online.lock().map(|o| o.clone()).unwrap_or_default();
    let model = |m: &Option<Arc<Loaded>>| match m {
        None => serde_json::Value::Null,
        Some(m) => serde_json::json!({
            "id": m.model.id,
            "kind": m.model.kind,
            "features": m.fitted.features,
            "label": m.fitted.label,
            "classes": m.fitted.classes,
            "online": on.get(&m.model.id).copied().unwrap_or_default().json(),
        }),
    };
    serde_json::json!({
        "line": name,
        "production": model(&l.production),
        "canary": model(&l.canary),
        "canary_share": if l.canary.is_some() { s.opts.canary.share } else { 0.0 },
        "shadow": s.opts.canary.shadow,
    })
}

async fn list_lines(State(s): State<Arc<Server>>) -> Response {
    let lines = s.snapshot();
    let out: Vec<serde_json::Value> = lines.iter().map(|(n, l)| line_json(&s, n, l)).collect();
    axum::Json(serde_json::json!({ "lines": out })).into_response()
}

async fn show_line(
    State(s): State<Arc<Server>>,
    Path((project, name)): Path<(String, String)>,
) -> Response {
    let line = format!("{project}/{name}");
    match s.snapshot().get(&line) {
        Some(l) => axum::Json(line_json(&s, &line, l)).into_response(),
        None => ApiError::UnknownLine(line).into_response(),
    }
}

/// Reads the body within the size and time limits.
async fn body_bytes(s: &Server, body: axum::body::Body) -> Result<axum::body::Bytes, ApiError> {
    let limit = s.opts.max_body_bytes;
    match tokio::time::timeout(s.opts.request_timeout, axum::body::to_bytes(body, limit)).await {
        Err(_) => Err(ApiError::Timeout(s.opts.request_timeout.as_millis())),
        Ok(Err(e)) => {
            // A length-limit error is reported as such; anything else is a
            // body that broke off.
            let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&e);
            let mut too_large = false;
            while let Some(c) = cause {
                too_large |= c.is::<http_body_util::LengthLimitError>();
                cause = c.source();
            }
            if too_large {
                Err(ApiError::TooLarge(limit))
            } else {
                Err(ApiError::Malformed(format!(
                    "the request body broke off: {e}"
                )))
            }
        }
        Ok(Ok(b)) => Ok(b),
    }
}

fn content_kind(headers: &HeaderMap) -> Result<bool, ApiError> {
    // true: CSV.
    let Some(ct) = headers.get(header::CONTENT_TYPE) else {
        return Ok(false);
    };
    let ct = ct.to_str().unwrap_or("").to_ascii_lowercase();
    let base = ct.split(';').next().unwrap_or("").trim().to_string();
    match base.as_str() {
        // `curl -d` labels any body a form: JSON in it is read as JSON.
        "" | "application/json" | "application/x-www-form-urlencoded" => Ok(false),
        "text/csv" | "application/csv" => Ok(true),
        _ => Err(ApiError::UnsupportedType(base)),
    }
}

/// Scores `rows` with one model.
fn score(m: &Loaded, rows: &input::Rows) -> Result<(Scored, Vec<serde_json::Value>), ApiError> {
    let x = rows.matrix(&m.fitted.features)?;
    let t = dsv_train::table::Table {
        features: m.fitted.features.clone(),
        x,
        y: Vec::new(),
        rows: rows.rows,
    };
    let (probs, pred) = m
        .fitted
        .scores(&t)
        .map_err(|e| ApiError::Malformed(e.to_string()))?;
    let classes = &m.fitted.classes;
    let mut out = Vec::with_capacity(rows.rows);
    let mut kept = Vec::with_capacity(rows.rows);
    for (i, c) in pred.iter().enumerate() {
        let row = probs.row(i);
        let mut p = serde_json::Map::new();
        for (j, v) in row.iter().enumerate() {
            p.insert(label_text(classes[j]), serde_json::json!(v));
        }
        out.push(serde_json::json!({"label": classes[*c], "probabilities": p}));
        kept.push((*c as u32, row.iter().map(|v| *v as f32).collect()));
    }
    Ok((
        Scored {
            model: m.id.clone(),
            classes: m.classes.clone(),
            rows: kept,
        },
        out,
    ))
}

fn label_text(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        v.to_string()
    }
}

async fn predict(
    State(s): State<Arc<Server>>,
    Path((project, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Response {
    let t0 = Instant::now();
    let line = format!("{project}/{name}");
    let r = predict_inner(&s, &line, &headers, body).await;
    s.metrics.observe(&line, t0.elapsed());
    match r {
        Ok((model, role, resp)) => {
            s.metrics.request(&line, &model, role.as_str(), 200);
            resp
        }
        Err(e) => {
            s.metrics.error(&line, e.code());
            e.into_response()
        }
    }
}

async fn predict_inner(
    s: &Arc<Server>,
    line_name: &str,
    headers: &HeaderMap,
    body: axum::body::Body,
) -> Result<(String, Role, Response), ApiError> {
    let lines = s.snapshot();
    let line = lines
        .get(line_name)
        .cloned()
        .ok_or_else(|| ApiError::UnknownLine(line_name.to_string()))?;
    let csv = content_kind(headers)?;
    let bytes = body_bytes(s, body).await?;
    let key_field = s.opts.canary.key_field.as_deref();
    let rows = if csv {
        input::csv(&bytes, key_field)?
    } else {
        input::json(&bytes, key_field)?
    };
    if rows.rows > s.opts.max_rows {
        return Err(ApiError::TooManyRows {
            rows: rows.rows,
            max: s.opts.max_rows,
        });
    }
    rows.check_known(&line.known)?;
    let key = headers
        .get(s.opts.canary.key_header.as_str())
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| rows.key.clone());
    let (answer, role, shadow) = match (&line.production, &line.canary) {
        (None, None) => return Err(ApiError::NoModel(line_name.to_string())),
        (Some(p), None) => (p, Role::Production, None),
        (None, Some(c)) => (c, Role::Canary, None),
        (Some(p), Some(c)) => {
            if s.opts.canary.shadow {
                (p, Role::Production, Some(c))
            } else {
                let point = match &key {
                    Some(k) => key_point(k),
                    None => rand::random::<f64>(),
                };
                if point < s.opts.canary.share {
                    (c, Role::Canary, None)
                } else {
                    (p, Role::Production, None)
                }
            }
        }
    };
    let (scored, predictions) = score(answer, &rows)?;
    let mut kept = vec![scored];
    if let Some(c) = shadow {
        // The candidate's answer is kept for feedback, never returned; a
        // candidate that cannot read the rows does not fail the request.
        match score(c, &rows) {
            Ok((sc, _)) => kept.push(sc),
            Err(e) => tracing::debug!("{line_name}: the shadow canary failed: {e}"),
        }
    }
    let id = s.remember(&line.name, kept);
    let rid = format!("{id:032x}");
    let body = serde_json::json!({
        "line": line_name,
        "model": answer.model.id,
        "role": role.as_str(),
        "request_id": rid,
        "predictions": predictions,
    });
    let mut resp = axum::Json(body).into_response();
    if let Ok(v) = HeaderValue::from_str(&answer.model.id) {
        resp.headers_mut().insert("x-dsv-model", v);
    }
    if let Ok(v) = HeaderValue::from_str(&rid) {
        resp.headers_mut().insert("x-dsv-request-id", v);
    }
    Ok((answer.model.id.clone(), role, resp))
}

#[derive(serde::Deserialize)]
struct FeedbackItem {
    request_id: String,
    #[serde(default)]
    label: Option<f64>,
    #[serde(default)]
    labels: Option<Vec<f64>>,
}

#[derive(serde::Deserialize)]
#[serde(untagged)]
enum FeedbackBody {
    Many { feedback: Vec<FeedbackItem> },
    List(Vec<FeedbackItem>),
    One(FeedbackItem),
}

async fn feedback(
    State(s): State<Arc<Server>>,
    Path((project, name)): Path<(String, String)>,
    body: axum::body::Body,
) -> Response {
    let line = format!("{project}/{name}");
    match feedback_inner(&s, &line, body).await {
        Ok(r) => r,
        Err(e) => {
            s.metrics.error(&line, e.code());
            e.into_response()
        }
    }
}

async fn feedback_inner(
    s: &Arc<Server>,
    line_name: &str,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    if !s.snapshot().contains_key(line_name) {
        return Err(ApiError::UnknownLine(line_name.to_string()));
    }
    let bytes = body_bytes(s, body).await?;
    let items =
        match serde_json::from_slice::<FeedbackBody>(&bytes) {
            Ok(FeedbackBody::Many { feedback }) => feedback,
            Ok(FeedbackBody::List(l)) => l,
            Ok(FeedbackBody::One(i)) => vec![i],
            Err(_) => return Err(ApiError::Malformed(
                "feedback is {\"request_id\": ID, \"label\": VALUE} (or \"labels\": [..] for a \
                 batch request), a list of them, or {\"feedback\": [...]}"
                    .into(),
            )),
        };
    let mut accepted = 0u64;
    let mut unknown = Vec::new();
    for (i, it) in items.iter().enumerate() {
        let labels: Vec<f64> = match (&it.label, &it.labels) {
            (Some(l), None) => vec![*l],
            (None, Some(l)) => l.clone(),
            _ => {
                return Err(ApiError::Malformed(format!(
                    "feedback item {}: give \"label\" or \"labels\"",
                    i + 1
                )))
            }
        };
        let id = u128::from_str_radix(&it.request_id, 16).ok();
        let entry = id.and_then(|id| {
            let mut p = s.pending.lock().ok()?;
            let e = p.by_id.get(&id)?;
            if &*e.0 != line_name {
                return None;
            }
            p.by_id.remove(&id)
        });
        let Some((_, scored)) = entry else {
            unknown.push(it.request_id.clone());
            continue;
        };
        if scored
            .first()
            .is_some_and(|sc| sc.rows.len() != labels.len())
        {
            return Err(ApiError::Malformed(format!(
                "feedback for request {}: {} labels for {} rows",
                it.request_id,
                labels.len(),
                scored[0].rows.len()
            )));
        }
        if let Ok(mut on) = s.online.lock() {
            for sc in &scored {
                let o = on.entry(sc.model.to_string()).or_default();
                for ((pred, probs), truth) in sc.rows.iter().zip(&labels) {
                    let t = sc.classes.iter().position(|c| c == truth);
                    let p_true = t.map_or(0.0, |t| probs[t] as f64);
                    o.add(t == Some(*pred as usize), p_true);
                }
            }
        }
        accepted += labels.len() as u64;
    }
    if accepted == 0 && !unknown.is_empty() {
        return Err(ApiError::UnknownRequest(unknown.join(", ")));
    }
    // The gate, off the async workers (a decision writes the repository).
    let lines = s.snapshot();
    let mut decision = serde_json::Value::Null;
    if let Some(l) = lines.get(line_name).cloned() {
        if let (Some(c), true) = (&l.canary, s.opts.canary.decide) {
            let on = s.online.lock().map(|o| o.clone()).unwrap_or_default();
            let co = on.get(&c.model.id).copied().unwrap_or_default();
            let po = l
                .production
                .as_ref()
                .and_then(|p| on.get(&p.model.id).copied())
                .unwrap_or_default();
            let v = if l.production.is_none() {
                Verdict::Undecided
            } else {
                gate::judge(
                    &co,
                    &po,
                    s.opts.canary.min_labeled,
                    s.opts.canary.confidence,
                )
            };
            if v != Verdict::Undecided {
                decision = serde_json::json!(match &v {
                    Verdict::Promote(r) => format!("promote: {r}"),
                    Verdict::Reject(r) => format!("reject: {r}"),
                    Verdict::Undecided => String::new(),
                });
                let s2 = s.clone();
                let name = line_name.to_string();
                let c = c.clone();
                let _ = tokio::task::spawn_blocking(move || s2.decide(&name, &l, &c, v)).await;
            }
        }
    }
    Ok(axum::Json(serde_json::json!({
        "accepted": accepted,
        "unknown": unknown,
        "decision": decision,
    }))
    .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_spread_evenly_and_stick() {
        let n = 10_000;
        let share = 0.2;
        let hits = (0..n)
            .filter(|i| key_point(&format!("user-{i}")) < share)
            .count();
        let got = hits as f64 / n as f64;
        assert!((got - share).abs() < 0.03, "{got}");
        assert_eq!(key_point("user-7"), key_point("user-7"));
        assert!((0.0..1.0).contains(&key_point("")));
    }

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abc", b"abd"));
        assert!(!same_secret(b"abc", b"abcd"));
        assert!(!same_secret(b"", b"a"));
    }
}
