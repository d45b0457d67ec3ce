//! `dsv serve`: the models of this repository over HTTP (the server is
//! `dsv-serve`; this file parses options, binds, prints where it listens
//! and stops on SIGINT/SIGTERM after the requests in flight).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use serde_json::json;

use crate::error::CliError;
use crate::Ctx;

/// `dsv serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Model lines to serve (PROJECT/NAME, repeatable); default: every line
    /// with a model tagged production or canary (new lines appear as they
    /// are tagged).
    #[arg(long = "line", value_name = "PROJECT/NAME")]
    lines: Vec<String>,
    /// Address to listen on (port 0: any free port). Any address but
    /// loopback needs --token-file.
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:8080")]
    bind: String,
    /// File holding the bearer token every request must carry (all but
    /// /healthz and /readyz).
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Share of request keys routed to a canary model (0 to 1).
    #[arg(long, value_name = "SHARE", default_value_t = 0.1)]
    canary_share: f64,
    /// Request header whose value routes a request (sticky: one key, one model).
    #[arg(long, value_name = "HEADER", default_value = "x-dsv-key")]
    key_header: String,
    /// Row field whose value routes a request (taken out of the row).
    #[arg(long, value_name = "FIELD")]
    key_field: Option<String>,
    /// The canary scores a copy of every request; production answers all.
    #[arg(long)]
    shadow: bool,
    /// Labeled rows each model needs before the canary gate decides.
    #[arg(long, value_name = "N", default_value_t = 200)]
    min_labeled: u64,
    /// One-sided confidence of the gate's two-proportion test.
    #[arg(long, value_name = "P", default_value_t = 0.95)]
    confidence: f64,
    /// Reject a canary still undecided this long after it was first served.
    #[arg(long, value_name = "SECONDS")]
    max_canary_duration: Option<u64>,
    /// Report online figures but never promote or reject.
    #[arg(long)]
    no_decide: bool,
    /// Largest request body, bytes.
    #[arg(long, value_name = "BYTES", default_value_t = 1 << 20)]
    max_body: usize,
    /// Most rows in one request.
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    max_rows: usize,
    /// Longest a request may take to arrive, seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 10)]
    timeout: u64,
    /// Answers remembered for feedback (the oldest are forgotten first;
    /// about 200 bytes each for a one-row request).
    #[arg(long, value_name = "N", default_value_t = 50_000)]
    remember: usize,
    /// HTTP worker threads (default: the number of CPUs).
    #[arg(long, value_name = "N")]
    workers: Option<usize>,
}

fn read_token(path: &std::path::Path) -> Result<String, CliError> {
    let t = std::fs::read_to_string(path).map_err(|e| {
        CliError::user(format!(
            "cannot read the token file {}: {e}",
            path.display()
        ))
    })?;
    let t = t.trim().to_string();
    if t.len() < 16 {
        return Err(CliError::user(format!(
            "the token in {} is {} characters; use at least 16 (e.g. `openssl rand -hex 32`)",
            path.display(),
            t.len()
        )));
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(m) = std::fs::metadata(path) {
            if m.permissions().mode() & 0o077 != 0 {
                tracing::warn!(
                    "{} is readable by other users; chmod 600 it",
                    path.display()
                );
            }
        }
    }
    Ok(t)
}

/// Runs `dsv serve`.
pub fn serve(ctx: &Ctx, a: ServeArgs) -> Result<(), CliError> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let addr: SocketAddr = a
        .bind
        .parse()
        .map_err(|_| CliError::user(format!("--bind {}: not an ADDRESS:PORT", a.bind)))?;
    let token = match &a.token_file {
        Some(p) => Some(read_token(p)?),
        None => None,
    };
    if !addr.ip().is_loopback() && token.is_none() {
        return Err(CliError::user(format!(
            "serving on {addr} (beyond this machine) needs --token-file: requests must carry \
             its bearer token"
        )));
    }
    let repo = Arc::new(crate::repo::open_repo(ctx)?);
    let opts = dsv_serve::ServeOptions {
        lines: a.lines,
        max_body_bytes: a.max_body,
        max_rows: a.max_rows,
        request_timeout: Duration::from_secs(a.timeout.max(1)),
        token,
        remember: a.remember,
        canary: dsv_serve::CanaryOptions {
            share: a.canary_share,
            key_header: a.key_header.to_ascii_lowercase(),
            key_field: a.key_field,
            shadow: a.shadow,
            min_labeled: a.min_labeled,
            confidence: a.confidence,
            max_duration: a.max_canary_duration.map(Duration::from_secs),
            decide: !a.no_decide,
        },
    };
    let server = dsv_serve::Server::new(repo, opts).map_err(serve_err)?;
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = server.watch(stop.clone()).map_err(serve_err)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(
            a.workers
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get())),
        )
        .thread_name("dsv-serve")
        .enable_all()
        .build()
        .map_err(|e| CliError::repo(format!("cannot start the server's runtime: {e}")))?;
    let listener = rt
        .block_on(tokio::net::TcpListener::bind(addr))
        .map_err(|e| CliError::user(format!("cannot listen on {addr}: {e}")))?;
    let local = listener
        .local_addr()
        .map_err(|e| CliError::repo(format!("cannot read the listening address: {e}")))?;
    let served = server.served();
    if ctx.json {
        // One line (a long-running command's first record; a reader takes
        // the address from it while the server runs).
        println!(
            "{}",
            json!({
                "listening": format!("http://{local}"),
                "lines": served.iter().map(|(l, p, c)| json!({"line": l, "production": p, "canary": c})).collect::<Vec<_>>(),
            })
        );
    } else {
        println!("serving {} model line(s) on http://{local}", served.len());
        for (l, p, c) in &served {
            println!(
                "  {l}: production {}{}",
                p.as_deref().map_or("none", |s| &s[..12.min(s.len())]),
                c.as_deref()
                    .map(|c| format!(", canary {}", &c[..12.min(c.len())]))
                    .unwrap_or_default()
            );
        }
    }
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let shutdown = async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => return std::future::pending().await,
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    let _ = (SIGINT, SIGTERM);
    let r = rt.block_on(dsv_serve::serve(listener, server, shutdown));
    stop.store(true, std::sync::atomic::Ordering::Release);
    let _ = watcher.join();
    r.map_err(serve_err)
}

fn serve_err(e: dsv_serve::Error) -> CliError {
    match e {
        dsv_serve::Error::Repo(e) => e.into(),
        dsv_serve::Error::Runtime(e) => e.into(),
        dsv_serve::Error::Options(m) => CliError::user(m),
        other => CliError::repo(other.to_string()),
    }
}
