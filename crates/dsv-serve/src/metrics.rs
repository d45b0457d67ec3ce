//! Prometheus metrics (text exposition format 0.0.4): requests and errors
//! by line, model, role and status; a latency histogram per line; model
//! swaps; online accuracy and log loss per model (set by the server when
//! it renders).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Upper bounds of the latency buckets, seconds.
pub const BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// One line's latency histogram.
#[derive(Default)]
struct Histogram {
    counts: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    /// Sum of durations, ns.
    sum_ns: AtomicU64,
}

/// A request counter's labels: line, model, role, status code.
type RequestLabels = (String, String, &'static str, u16);

/// Every counter of the server.
#[derive(Default)]
pub struct Metrics {
    /// (line, model, role, status code) → requests.
    requests: Mutex<BTreeMap<RequestLabels, u64>>,
    /// (line, error code) → errors.
    errors: Mutex<BTreeMap<(String, &'static str), u64>>,
    latency: Mutex<BTreeMap<String, std::sync::Arc<Histogram>>>,
    /// (line) → model swaps.
    swaps: Mutex<BTreeMap<String, u64>>,
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    /// Counts one answered request.
    pub fn request(&self, line: &str, model: &str, role: &'static str, status: u16) {
        if let Ok(mut m) = self.requests.lock() {
            *m.entry((line.to_string(), model.to_string(), role, status))
                .or_default() += 1;
        }
    }

    /// Counts one refused or failed request.
    pub fn error(&self, line: &str, code: &'static str) {
        if let Ok(mut m) = self.errors.lock() {
            *m.entry((line.to_string(), code)).or_default() += 1;
        }
    }

    /// Records one request's duration.
    pub fn observe(&self, line: &str, d: std::time::Duration) {
        let h = match self.latency.lock() {
            Ok(mut m) => m.entry(line.to_string()).or_default().clone(),
            Err(_) => return,
        };
        let s = d.as_secs_f64();
        for (i, b) in BUCKETS.iter().enumerate() {
            if s <= *b {
                h.counts[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        h.count.fetch_add(1, Ordering::Relaxed);
        h.sum_ns
            .fetch_add(d.as_nanos().min(u64::MAX as u128) as u64, Ordering::Relaxed);
    }

    /// Counts a model swap of `line`.
    pub fn swap(&self, line: &str) {
        if let Ok(mut m) = self.swaps.lock() {
            *m.entry(line.to_string()).or_default() += 1;
        }
    }

    /// The exposition text; `online` adds per-model gauges (line, model,
    /// role, online figures).
    pub fn render(&self, online: &[(String, String, &'static str, crate::gate::Online)]) -> String {
        let mut o = String::new();
        o.push_str("# HELP dsv_serve_requests_total Prediction requests answered.\n");
        o.push_str("# TYPE dsv_serve_requests_total counter\n");
        if let Ok(m) = self.requests.lock() {
            for ((line, model, role, code), n) in m.iter() {
                let _ = writeln!(
                    o,
                    "dsv_serve_requests_total{{line=\"{}\",model=\"{}\",role=\"{role}\",code=\"{code}\"}} {n}",
                    escape(line),
                    escape(model)
                );
            }
        }
        o.push_str("# HELP dsv_serve_errors_total Requests refused or failed, by reason.\n");
        o.push_str("# TYPE dsv_serve_errors_total counter\n");
        if let Ok(m) = self.errors.lock() {
            for ((line, code), n) in m.iter() {
                let _ = writeln!(
                    o,
                    "dsv_serve_errors_total{{line=\"{}\",code=\"{code}\"}} {n}",
                    escape(line)
                );
            }
        }
        o.push_str("# HELP dsv_serve_request_duration_seconds Time to answer a request.\n");
        o.push_str("# TYPE dsv_serve_request_duration_seconds histogram\n");
        if let Ok(m) = self.latency.lock() {
            for (line, h) in m.iter() {
                let l = escape(line);
                for (i, b) in BUCKETS.iter().enumerate() {
                    let _ = writeln!(
                        o,
                        "dsv_serve_request_duration_seconds_bucket{{line=\"{l}\",le=\"{b}\"}} {}",
                        h.counts[i].load(Ordering::Relaxed)
                    );
                }
                let n = h.count.load(Ordering::Relaxed);
                let _ = writeln!(
                    o,
                    "dsv_serve_request_duration_seconds_bucket{{line=\"{l}\",le=\"+Inf\"}} {n}"
                );
                let _ = writeln!(
                    o,
                    "dsv_serve_request_duration_seconds_sum{{line=\"{l}\"}} {}",
                    h.sum_ns.load(Ordering::Relaxed) as f64 / 1e9
                );
                let _ = writeln!(
                    o,
                    "dsv_serve_request_duration_seconds_count{{line=\"{l}\"}} {n}"
                );
            }
        }
        o.push_str("# HELP dsv_serve_model_swaps_total Times a line's served models changed.\n");
        o.push_str("# TYPE dsv_serve_model_swaps_total counter\n");
        if let Ok(m) = self.swaps.lock() {
            for (line, n) in m.iter() {
                let _ = writeln!(
                    o,
                    "dsv_serve_model_swaps_total{{line=\"{}\"}} {n}",
                    escape(line)
                );
            }
        }
        for (name, help) in [
            (
                "dsv_serve_online_labeled_total",
                "Rows labeled by feedback.",
            ),
            (
                "dsv_serve_online_accuracy",
                "Online accuracy from feedback.",
            ),
            (
                "dsv_serve_online_log_loss",
                "Online log loss from feedback.",
            ),
        ] {
            let _ = writeln!(o, "# HELP {name} {help}");
            let kind = if name.ends_with("_total") {
                "counter"
            } else {
                "gauge"
            };
            let _ = writeln!(o, "# TYPE {name} {kind}");
            for (line, model, role, on) in online {
                let v = match name {
                    "dsv_serve_online_labeled_total" => on.labeled as f64,
                    "dsv_serve_online_accuracy" => on.accuracy(),
                    _ => on.log_loss(),
                };
                if v.is_finite() {
                    let _ = writeln!(
                        o,
                        "{name}{{line=\"{}\",model=\"{}\",role=\"{role}\"}} {v}",
                        escape(line),
                        escape(model)
                    );
                }
            }
        }
        o
    }
}
