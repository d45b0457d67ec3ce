//! End-to-end tests of `dsv serve`: predictions from the production model
//! (JSON and CSV), faults answered with 4xx JSON while serving goes on,
//! sticky canary routing, the feedback gate promoting a better canary and
//! rejecting a worse one (model events, `dsv model history`), a swap
//! under a burst of requests losing none, and the token.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use dsv_tests::{occupancy_dir, Sandbox};
use serde_json::{json, Value};

/// One HTTP/1.1 request; (status, body).
fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, Vec<u8>) {
    let mut c = std::net::TcpStream::connect(addr).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    c.write_all(head.as_bytes()).unwrap();
    c.write_all(body).unwrap();
    let mut out = Vec::new();
    let _ = c.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let at = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(out.len(), |p| p + 4);
    (code, out[at..].to_vec())
}

fn post_json(addr: &str, path: &str, headers: &[(&str, &str)], v: &Value) -> (u16, Value) {
    let mut h = vec![("Content-Type", "application/json")];
    h.extend_from_slice(headers);
    let (code, body) = http(addr, "POST", path, &h, v.to_string().as_bytes());
    (code, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

fn get_json(addr: &str, path: &str) -> (u16, Value) {
    let (code, body) = http(addr, "GET", path, &[], b"");
    (code, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

/// The held-back rows of datatest2.txt: features and label.
fn test_rows() -> Vec<(Value, f64)> {
    let text = std::fs::read_to_string(occupancy_dir().join("datatest2.txt")).unwrap();
    let mut out = Vec::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        let n = f.len();
        let num = |i: usize| f[i].trim().trim_matches('"').parse::<f64>().unwrap();
        out.push((
            json!({
                "Temperature": num(n - 6), "Humidity": num(n - 5), "Light": num(n - 4),
                "CO2": num(n - 3), "HumidityRatio": num(n - 2),
            }),
            num(n - 1),
        ));
    }
    // A fixed shuffle: the file is in time order (long runs of one class).
    let n = out.len();
    (0..n).map(|i| out[(i * 7919) % n].clone()).collect()
}

fn train(s: &Sandbox, kind: &str, features: &str, extra: &[&str]) -> String {
    let mut args = vec![
        "task",
        "create",
        "occ/model",
        "--trainer",
        kind,
        "--set",
        "General/dataset_id=occ/train",
        "--set",
        "General/test_dataset_id=occ/eval",
        "--set",
        "General/label=Occupancy",
    ];
    let f = format!("General/features={features}");
    args.extend_from_slice(&["--set", &f]);
    args.extend_from_slice(extra);
    let t = s.json(&args)["id"].as_str().unwrap().to_string();
    assert!(s.dsv(&["task", "run", &t]).status.success());
    s.json(&["task", "show", &t])["models"][0]
        .as_str()
        .unwrap()
        .to_string()
}

fn sync(s: &Sandbox, dataset: &str, file: &str) {
    let d = s.path(dataset.split('/').nth(1).unwrap());
    std::fs::create_dir_all(&d).unwrap();
    std::fs::copy(occupancy_dir().join(file), d.join(file)).unwrap();
    s.json(&["dataset", "sync", dataset, d.to_str().unwrap()]);
}

/// A running `dsv serve`; killed when dropped.
struct Serve {
    child: Child,
    addr: String,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(s: &Sandbox, args: &[&str]) -> Serve {
    let mut child = s
        .cmd(&[&["--json", "serve", "--bind", "127.0.0.1:0"], args].concat())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
    let addr = v["listening"]
        .as_str()
        .unwrap()
        .trim_start_matches("http://")
        .to_string();
    Serve { child, addr }
}

/// Waits (bounded) until the server reports `role` of the line as `model`.
fn until_served(addr: &str, role: &str, model: Option<&str>) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, v) = get_json(addr, "/v1/models/occ/model");
        if v[role]["id"].as_str() == model {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{role} never became {model:?}: {v}"
        );
        std::thread::yield_now();
    }
}

fn tags(s: &Sandbox, model: &str) -> Vec<String> {
    s.json(&["model", "show", model])["tags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect()
}

const PREDICT: &str = "/v1/models/occ/model/predict";
const FEEDBACK: &str = "/v1/models/occ/model/feedback";

/// Sends every test row with a key, then its label; returns the decision
/// the server reported, if any.
fn feed(addr: &str, rows: &[(Value, f64)], prefix: &str) -> Option<String> {
    for (i, (row, label)) in rows.iter().enumerate() {
        let key = format!("{prefix}-{i}");
        let (code, v) = post_json(addr, PREDICT, &[("x-dsv-key", &key)], row);
        assert_eq!(code, 200, "{v}");
        let (code, f) = post_json(
            addr,
            FEEDBACK,
            &[],
            &json!({"request_id": v["request_id"], "label": label}),
        );
        assert_eq!(code, 200, "{f}");
        if let Some(d) = f["decision"].as_str() {
            return Some(d.to_string());
        }
    }
    None
}

#[test]
fn serves_production_refuses_bad_input_and_gates_canaries_on_feedback() {
    let s = Sandbox::new();
    sync(&s, "occ/train", "datatraining.txt");
    sync(&s, "occ/eval", "datatest.txt");
    // A weak model (one feature, one split), a good one, another weak one.
    let weak = train(&s, "tree", "Temperature", &["--set", "Model/max_depth=1"]);
    let good = train(
        &s,
        "logistic",
        "Temperature,Humidity,Light,CO2,HumidityRatio",
        &[],
    );
    let weaker = train(&s, "tree", "Humidity", &["--set", "Model/max_depth=1"]);
    s.json(&["model", "tag", &weak, "--add", "production"]);

    let srv = serve(
        &s,
        &[
            "--canary-share",
            "0.5",
            "--min-labeled",
            "60",
            "--confidence",
            "0.99",
            "--max-body",
            "65536",
        ],
    );
    let a = srv.addr.as_str();
    assert_eq!(get_json(a, "/healthz").0, 200);
    assert_eq!(get_json(a, "/readyz").0, 200);

    // One row, JSON: the production model answers with probabilities.
    let rows = test_rows();
    let (code, v) = post_json(a, PREDICT, &[], &rows[0].0);
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["model"], json!(weak));
    assert_eq!(v["role"], "production");
    let p = &v["predictions"][0];
    let (p0, p1) = (
        p["probabilities"]["0"].as_f64().unwrap(),
        p["probabilities"]["1"].as_f64().unwrap(),
    );
    assert!((p0 + p1 - 1.0).abs() < 1e-9, "{p}");
    assert!(p["label"] == json!(0.0) || p["label"] == json!(1.0), "{p}");
    // A batch as CSV: one prediction per row, as `dsv model predict` gives.
    let mut csv = String::from("Temperature,Humidity,Light,CO2,HumidityRatio\n");
    for (r, _) in &rows[..50] {
        csv.push_str(&format!(
            "{},{},{},{},{}\n",
            r["Temperature"], r["Humidity"], r["Light"], r["CO2"], r["HumidityRatio"]
        ));
    }
    let (code, body) = http(
        a,
        "POST",
        PREDICT,
        &[("Content-Type", "text/csv")],
        csv.as_bytes(),
    );
    assert_eq!(code, 200);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["predictions"].as_array().unwrap().len(), 50);
    std::fs::write(s.path("batch.csv"), &csv).unwrap();
    let offline = s.json(&[
        "model",
        "predict",
        &weak,
        s.path("batch.csv").to_str().unwrap(),
    ]);
    for i in 0..50 {
        assert_eq!(
            v["predictions"][i]["label"], offline["predictions"][i]["label"],
            "row {i}"
        );
    }

    // `curl -d` sends JSON labeled as a form: read as JSON.
    let form = [("Content-Type", "application/x-www-form-urlencoded")];
    let (code, _) = http(a, "POST", PREDICT, &form, rows[0].0.to_string().as_bytes());
    assert_eq!(code, 200);

    // Faults: 4xx JSON naming what is wrong; the server keeps serving.
    let bad: Vec<(u16, &str, Vec<u8>, &str)> = vec![
        (400, "malformed", b"{\"Temperature\": ".to_vec(), "application/json"),
        (422, "unknown_column", br#"{"Temperature": 1, "Humidity": 2, "Light": 3, "CO2": 4, "HumidityRatio": 0.1, "Colour": 1}"#.to_vec(), "application/json"),
        (422, "wrong_type", br#"{"Temperature": "warm", "Humidity": 2, "Light": 3, "CO2": 4, "HumidityRatio": 0.1}"#.to_vec(), "application/json"),
        (422, "missing_column", br#"{"Humidity": 2}"#.to_vec(), "application/json"),
        (413, "too_large", vec![b' '; 70_000], "application/json"),
        (415, "unsupported_type", b"x".to_vec(), "application/xml"),
    ];
    for (want, code_name, body, ct) in bad {
        let (code, out) = http(a, "POST", PREDICT, &[("Content-Type", ct)], &body);
        let v: Value = serde_json::from_slice(&out).unwrap_or(Value::Null);
        assert_eq!(
            (code, v["error"]["code"].as_str()),
            (want, Some(code_name)),
            "{v}"
        );
    }
    let (_, v) = post_json(
        a,
        PREDICT,
        &[],
        &json!({"Temperature": "warm", "Humidity": 1, "Light": 1, "CO2": 1, "HumidityRatio": 1}),
    );
    assert_eq!(v["error"]["column"], "Temperature");
    assert_eq!(v["error"]["row"], 1);
    assert_eq!(get_json(a, "/v1/models/occ/nope").0, 404);
    assert_eq!(
        post_json(a, "/v1/models/occ/nope/predict", &[], &rows[0].0).0,
        404
    );
    assert_eq!(post_json(a, PREDICT, &[], &rows[0].0).0, 200);

    // A better canary: sticky routing, then promoted by feedback while a
    // burst of requests runs — none fails, and the new production answers.
    s.json(&["model", "tag", &good, "--add", "canary"]);
    until_served(a, "canary", Some(&good));
    let mut seen = std::collections::HashMap::new();
    let mut to_canary = 0;
    for i in 0..2_000 {
        let key = format!("user-{i}");
        let (_, v) = post_json(a, PREDICT, &[("x-dsv-key", &key)], &rows[i % rows.len()].0);
        let m = v["model"].as_str().unwrap().to_string();
        if m == good {
            to_canary += 1;
        }
        seen.insert(key, m);
    }
    let share = to_canary as f64 / 2_000.0;
    assert!((share - 0.5).abs() < 0.03, "canary share {share}");
    for i in (0..2_000).step_by(7) {
        let key = format!("user-{i}");
        let (_, v) = post_json(a, PREDICT, &[("x-dsv-key", &key)], &rows[0].0);
        assert_eq!(
            v["model"].as_str(),
            seen.get(&key).map(|s| s.as_str()),
            "{key} moved"
        );
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let burst = {
        let stop = stop.clone();
        let addr = srv.addr.clone();
        let row = rows[1].0.clone();
        std::thread::spawn(move || {
            let (mut ok, mut failed) = (0u64, 0u64);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match post_json(&addr, PREDICT, &[], &row).0 {
                    200 => ok += 1,
                    _ => failed += 1,
                }
            }
            (ok, failed)
        })
    };
    let decision = feed(a, &rows, "promote").expect("the gate decided");
    assert!(decision.starts_with("promote"), "{decision}");
    until_served(a, "production", Some(&good));
    until_served(a, "canary", None);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = burst.join().unwrap();
    assert!(ok > 0);
    assert_eq!(failed, 0, "requests failed during the swap");
    assert_eq!(
        post_json(a, PREDICT, &[], &rows[0].0).1["model"],
        json!(good)
    );
    assert!(tags(&s, &good).contains(&"production".to_string()));
    assert!(!tags(&s, &good).contains(&"canary".to_string()));
    assert!(tags(&s, &weak).contains(&"previous".to_string()));

    // A worse canary is rejected; production stays.
    s.json(&["model", "tag", &weaker, "--add", "canary"]);
    until_served(a, "canary", Some(&weaker));
    let decision = feed(a, &rows, "reject").expect("the gate decided");
    assert!(decision.starts_with("reject"), "{decision}");
    until_served(a, "canary", None);
    until_served(a, "production", Some(&good));
    let t = tags(&s, &weaker);
    assert!(
        t.contains(&"rejected".to_string()) && !t.contains(&"canary".to_string()),
        "{t:?}"
    );

    // Both decisions are model events with their reasons.
    let h = s.json(&["model", "history", "occ/model"]);
    let decided: Vec<(&str, &str)> = h
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| {
            Some((
                e["extra"]["decision"].as_str()?,
                e["extra"]["model"].as_str()?,
            ))
        })
        .collect();
    assert_eq!(
        decided,
        [("rejected", weaker.as_str()), ("promoted", good.as_str())]
    );
    let reason = h[0]["extra"]["reason"].as_str().unwrap();
    assert!(reason.contains("online accuracy"), "{reason}");

    // Metrics: requests, latency, online accuracy per model.
    let (code, m) = http(a, "GET", "/metrics", &[], b"");
    let m = String::from_utf8(m).unwrap();
    assert_eq!(code, 200);
    for want in [
        "dsv_serve_requests_total{line=\"occ/model\"",
        "dsv_serve_request_duration_seconds_bucket{line=\"occ/model\",le=\"+Inf\"}",
        "dsv_serve_errors_total{line=\"occ/model\",code=\"wrong_type\"} 2",
        "dsv_serve_online_accuracy{line=\"occ/model\"",
        "dsv_serve_model_swaps_total{line=\"occ/model\"}",
    ] {
        assert!(m.contains(want), "{want} not in\n{m}");
    }
}

#[test]
fn a_token_guards_everything_but_health_and_beyond_loopback_one_is_required() {
    let s = Sandbox::new();
    sync(&s, "occ/train", "datatraining.txt");
    sync(&s, "occ/eval", "datatest.txt");
    let m = train(&s, "logistic", "Temperature,Light,CO2", &[]);
    s.json(&["model", "tag", &m, "--add", "production"]);
    // Beyond loopback without a token: refused before listening.
    let o = s.dsv(&["serve", "--bind", "0.0.0.0:0"]);
    assert!(!o.status.success());
    assert!(
        dsv_tests::stderr(&o).contains("--token-file"),
        "{}",
        dsv_tests::stderr(&o)
    );
    // A short token is refused too.
    std::fs::write(s.path("short"), "abc").unwrap();
    let o = s.dsv(&["serve", "--token-file", s.path("short").to_str().unwrap()]);
    assert!(!o.status.success());
    let token = "0123456789abcdef0123456789abcdef";
    std::fs::write(s.path("token"), format!("{token}\n")).unwrap();
    let srv = serve(&s, &["--token-file", s.path("token").to_str().unwrap()]);
    let a = srv.addr.as_str();
    let row = json!({"Temperature": 23.0, "Light": 500.0, "CO2": 900.0});
    assert_eq!(get_json(a, "/healthz").0, 200);
    assert_eq!(get_json(a, "/readyz").0, 200);
    assert_eq!(post_json(a, PREDICT, &[], &row).0, 401);
    assert_eq!(
        post_json(a, PREDICT, &[("Authorization", "Bearer wrong")], &row).0,
        401
    );
    assert_eq!(get_json(a, "/metrics").0, 401);
    let bearer = format!("Bearer {token}");
    let (code, v) = post_json(a, PREDICT, &[("Authorization", &bearer)], &row);
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["model"], json!(m));
}

#[test]
fn a_task_trigger_makes_each_good_new_model_the_canary_the_server_tries() {
    let s = Sandbox::new();
    sync(&s, "occ/train", "datatraining.txt");
    sync(&s, "occ/eval", "datatest.txt");
    let prod = train(&s, "logistic", "Temperature,Light,CO2", &[]);
    s.json(&["model", "tag", &prod, "--add", "production"]);
    // Models of completed tasks above a threshold become the canary.
    s.json(&[
        "trigger",
        "add",
        "task",
        "try-new",
        "--project",
        "occ",
        "--canary",
        "--metric",
        "test/accuracy",
        "--above",
        "0.9",
    ]);
    let srv = serve(&s, &["--canary-share", "1"]);
    let a = srv.addr.as_str();
    let all = "Temperature,Humidity,Light,CO2,HumidityRatio";
    let first = train(&s, "logistic", all, &[]);
    // A model below the threshold is not tried.
    let poor = train(&s, "tree", "Humidity", &["--set", "Model/max_depth=1"]);
    assert!(s.dsv(&["trigger", "run", "--once"]).status.success());
    assert!(tags(&s, &first).contains(&"canary".to_string()));
    assert!(!tags(&s, &poor).contains(&"canary".to_string()));
    until_served(a, "canary", Some(&first));
    let row = &test_rows()[0].0;
    let (_, v) = post_json(a, PREDICT, &[("x-dsv-key", "k")], row);
    assert_eq!(
        (v["model"].as_str(), v["role"].as_str()),
        (Some(first.as_str()), Some("canary"))
    );
    // A newer good model replaces the canary (one per line).
    let second = train(&s, "tree", all, &["--set", "Model/max_depth=3"]);
    assert!(s.dsv(&["trigger", "run", "--once"]).status.success());
    assert!(!tags(&s, &first).contains(&"canary".to_string()));
    assert!(tags(&s, &second).contains(&"canary".to_string()));
    until_served(a, "canary", Some(&second));
    let h = s.json(&["model", "history", "occ/model"]);
    let superseded = h.as_array().unwrap().iter().any(|e| {
        e["extra"]["model"] == json!(first)
            && e["tags_removed"] == json!(["canary"])
            && e["extra"]["reason"]
                .as_str()
                .is_some_and(|r| r.contains(&second))
    });
    assert!(superseded, "{h}");
    assert_eq!(tags(&s, &prod), vec!["production".to_string()]);
}

#[test]
fn in_shadow_mode_production_answers_everyone_and_the_canary_is_judged_on_the_same_rows() {
    let s = Sandbox::new();
    sync(&s, "occ/train", "datatraining.txt");
    sync(&s, "occ/eval", "datatest.txt");
    let weak = train(&s, "tree", "Temperature", &["--set", "Model/max_depth=1"]);
    let good = train(
        &s,
        "logistic",
        "Temperature,Humidity,Light,CO2,HumidityRatio",
        &[],
    );
    s.json(&["model", "tag", &weak, "--add", "production"]);
    s.json(&["model", "tag", &good, "--add", "canary"]);
    let srv = serve(
        &s,
        &["--shadow", "--min-labeled", "60", "--confidence", "0.99"],
    );
    let a = srv.addr.as_str();
    let rows = test_rows();
    let mut decision = None;
    let mut answered = 0;
    for (i, (row, label)) in rows.iter().enumerate() {
        let key = format!("user-{i}");
        let (code, v) = post_json(a, PREDICT, &[("x-dsv-key", &key)], row);
        assert_eq!(code, 200, "{v}");
        if decision.is_none() {
            // Until the decision, production answers every request.
            assert_eq!(
                (v["model"].as_str(), v["role"].as_str()),
                (Some(weak.as_str()), Some("production"))
            );
            answered += 1;
        } else {
            break;
        }
        let (_, f) = post_json(
            a,
            FEEDBACK,
            &[],
            &json!({"request_id": v["request_id"], "label": label}),
        );
        decision = f["decision"].as_str().map(str::to_string);
    }
    let decision = decision.expect("the gate decided");
    assert!(decision.starts_with("promote"), "{decision}");
    // Both models were judged on every labeled row: the gate needed only
    // its minimum of rows on each side, not twice as many.
    assert!(answered <= 200, "{answered} rows before deciding");
    let (_, line) = get_json(a, "/v1/models/occ/model");
    assert_eq!(line["production"]["id"], json!(good), "{line}");
    let h = s.json(&["model", "history", "occ/model", "-n", "1"]);
    assert_eq!(h[0]["extra"]["decision"], "promoted");
    let online = &h[0]["extra"]["online"];
    assert_eq!(online["shadow"], true, "{online}");
    assert_eq!(
        online["canary"]["labeled"], online["production"]["labeled"],
        "{online}"
    );
}
