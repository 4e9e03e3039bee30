//! `/metrics` end to end with a real Prometheus server (Debian's
//! `prometheus` package, installed by `cargo xtask setup`; needs root for
//! leaktrace).
//!
//! Two `conn_leak` fixtures run side by side: one leaks a connection every
//! 50 ms from `bad_handler` through `dial_cache`, the other (`--no-leak`) only
//! has its steady pool (also opened through `dial_cache`) and dial-then-close
//! churn. Each is traced by its own `leaktrace attach --listen 127.0.0.1:0`,
//! and one Prometheus scrapes both every second as two targets of one job.
//! The test then asks Prometheus's HTTP API what it stored: the leaking
//! site's series rises and carries verdict="leak"; the look-alike's, told
//! apart by the `pid` label, stays flat and never does.

mod common;

use std::{
    fs,
    io::{BufRead, BufReader, Read, Write},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{mpsc, Arc, Mutex},
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use common::*;
use serde_json::Value;

const PROMETHEUS: &str = "/usr/bin/prometheus";

/// Seconds of scraping the assertions look at (after both targets are up).
const WINDOW: Duration = Duration::from_secs(15);

/// A child process stopped on drop (SIGTERM, then SIGKILL after 5 s), so
/// that nothing outlives the test, whether it passes or panics.
struct Proc {
    name: &'static str,
    child: Child,
}

impl Proc {
    /// Panics (with `log`) if the process has already exited.
    fn assert_running(&mut self, log: &dyn Fn() -> String) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("{} exited early ({status}):\n{}", self.name, log());
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                thread::sleep(Duration::from_millis(50));
            }
            eprintln!("{} ignored SIGTERM; killing it", self.name);
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().subsec_nanos();
        let p = std::env::temp_dir().join(format!("leaktrace-{tag}-{}-{nanos}", std::process::id()));
        fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A running `leaktrace attach --listen 127.0.0.1:0` and the address it bound.
struct Tracer {
    proc: Proc,
    addr: String,
    stderr: Arc<Mutex<String>>,
}

/// Starts `leaktrace attach` on `pid` and waits (bounded) for the line that
/// names the metrics address. Its stderr keeps being collected for messages.
fn start_tracer(pid: u32) -> Tracer {
    let pid = pid.to_string();
    let mut child = Command::new(leaktrace())
        .args(["attach", "--pid", &pid, "--interval", "1s", "--listen", "127.0.0.1:0", "--for", "40s"])
        .args(["--format", "json"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start leaktrace");
    let stderr = child.stderr.take().unwrap();
    let proc = Proc { name: "leaktrace", child };
    let collected = Arc::new(Mutex::new(String::new()));
    let (tx, rx) = mpsc::channel();
    {
        let collected = collected.clone();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.split("serving metrics at http://").nth(1) {
                    let _ = tx.send(rest.trim_end_matches("/metrics").to_string());
                }
                let mut c = collected.lock().unwrap();
                c.push_str(&line);
                c.push('\n');
            }
        });
    }
    let addr = rx.recv_timeout(Duration::from_secs(30)).unwrap_or_else(|_| {
        panic!(
            "leaktrace --pid {pid} never said where it serves metrics; stderr:\n{}",
            collected.lock().unwrap()
        )
    });
    Tracer { proc, addr, stderr: collected }
}

fn now_unix() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

// ------------------------------------------------------------ HTTP client

/// Percent-encodes a query parameter value.
fn encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Decodes a `Transfer-Encoding: chunked` body.
fn dechunk(mut body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = body.windows(2).position(|w| w == b"\r\n") {
        let size_field = std::str::from_utf8(&body[..eol]).unwrap_or("0");
        let size = usize::from_str_radix(size_field.split(';').next().unwrap().trim(), 16).unwrap_or(0);
        body = &body[eol + 2..];
        if size == 0 || body.len() < size {
            break;
        }
        out.extend_from_slice(&body[..size]);
        body = body.get(size + 2..).unwrap_or(&[]);
    }
    out
}

/// `GET path` over HTTP/1.1 (`Connection: close`): status and body.
fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no end of headers"))?;
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let body = &raw[split + 4..];
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line: {head}")))?;
    let chunked = head
        .lines()
        .any(|l| l.to_ascii_lowercase().starts_with("transfer-encoding:") && l.to_ascii_lowercase().contains("chunked"));
    let body = if chunked { dechunk(body) } else { body.to_vec() };
    Ok((status, String::from_utf8_lossy(&body).to_string()))
}

/// A Prometheus server under test.
struct Prometheus {
    addr: String,
    log: PathBuf,
    proc: Proc,
}

impl Prometheus {
    fn log(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// `GET /api/v1/<endpoint>?params`: the `data` of a successful answer.
    fn api(&self, endpoint: &str, params: &[(&str, &str)]) -> Value {
        let query: Vec<String> = params.iter().map(|(k, v)| format!("{k}={}", encode(v))).collect();
        let path = format!("/api/v1/{endpoint}?{}", query.join("&"));
        let (status, body) = http_get(&self.addr, &path).unwrap_or_else(|e| panic!("GET {path}: {e}"));
        let v: Value =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {status}, not JSON ({e}): {body}"));
        assert_eq!(v["status"], "success", "GET {path}: {status} {body}");
        v["data"].clone()
    }

    /// An instant query: the result vector.
    fn query(&self, q: &str) -> Vec<Value> {
        let data = self.api("query", &[("query", q)]);
        data["result"].as_array().cloned().unwrap_or_default()
    }

    /// An instant query expected to give exactly one sample: its value.
    fn query_one(&self, q: &str) -> f64 {
        let r = self.query(q);
        assert_eq!(r.len(), 1, "{q}: expected one series, got {r:?}");
        value(&r[0]["value"])
    }

    /// A range query with a 1 s step: per series, its labels and (time, value) points.
    fn query_range(&self, q: &str, start: f64, end: f64) -> Vec<(Value, Vec<(f64, f64)>)> {
        let (start, end) = (format!("{start:.3}"), format!("{end:.3}"));
        let data = self.api("query_range", &[("query", q), ("start", &start), ("end", &end), ("step", "1s")]);
        data["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .map(|s| {
                let points = s["values"].as_array().unwrap().iter().map(|p| (p[0].as_f64().unwrap(), value(p))).collect();
                (s["metric"].clone(), points)
            })
            .collect()
    }
}

/// The value of a `[time, "value"]` pair.
fn value(pair: &Value) -> f64 {
    pair[1].as_str().and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("not a sample: {pair}"))
}

fn start_prometheus(dir: &Path, targets: &[&str]) -> Prometheus {
    let targets: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
    let config = dir.join("prometheus.yml");
    fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: leaktrace\n    static_configs:\n      - targets: [{}]\n",
            targets.join(", ")
        ),
    )
    .unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let log = dir.join("prometheus.log");
    let child = Command::new(PROMETHEUS)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
        .arg(format!("--web.listen-address={addr}"))
        .stdin(Stdio::null())
        .stdout(fs::File::create(&log).unwrap())
        .stderr(fs::File::options().append(true).open(&log).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("start {PROMETHEUS}: {e}"));
    Prometheus { addr, log, proc: Proc { name: "prometheus", child } }
}

/// Waits (bounded) until Prometheus has scraped every target in `addrs`
/// successfully and each serves a report (`leaktrace_up` 1).
fn wait_for_scrapes(prom: &mut Prometheus, addrs: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = String::from("(no answer yet)");
    loop {
        let log = prom.log();
        prom.proc.assert_running(&|| log.clone());
        if let Ok((200, body)) = http_get(&prom.addr, "/api/v1/targets") {
            let v: Value = serde_json::from_str(&body).unwrap_or_default();
            let active = v["data"]["activeTargets"].as_array().cloned().unwrap_or_default();
            let up = |addr: &str| {
                active.iter().any(|t| t["labels"]["instance"] == addr && t["health"] == "up")
            };
            last = active
                .iter()
                .map(|t| format!("{} {} {}", t["labels"]["instance"], t["health"], t["lastError"]))
                .collect::<Vec<_>>()
                .join("; ");
            if addrs.iter().all(|a| up(a)) {
                let reporting = addrs.iter().all(|a| {
                    prom.query(&format!("leaktrace_up{{instance=\"{a}\"}} == 1")).len() == 1
                });
                if reporting {
                    return;
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus did not scrape {addrs:?} in 30 s; targets: {last}\nlog:\n{}",
            prom.log()
        );
        thread::sleep(Duration::from_millis(250));
    }
}

/// `(value at the first point, value at the middle point, value at the last point)`.
fn first_mid_last(points: &[(f64, f64)]) -> (f64, f64, f64) {
    (points[0].1, points[points.len() / 2].1, points[points.len() - 1].1)
}

#[test]
fn prometheus_scrapes_a_rising_leak_and_a_flat_lookalike() {
    assert!(
        Path::new(PROMETHEUS).exists(),
        "{PROMETHEUS} is missing: this test needs Debian's `prometheus` package; \
         `cargo xtask setup` installs it (or: apt-get install -y prometheus)"
    );
    // Dropped in reverse order: Prometheus, then the tracers, then the fixtures.
    let leaky = start("conn_leak", &[]);
    let clean = start("conn_leak", &["--no-leak"]);
    let (leak_pid, clean_pid) = (leaky.pid().to_string(), clean.pid().to_string());
    let mut leak_tracer = start_tracer(leaky.pid());
    let mut clean_tracer = start_tracer(clean.pid());
    let dir = TempDir::new("prometheus");
    let addrs = [leak_tracer.addr.as_str(), clean_tracer.addr.as_str()];
    let mut prom = start_prometheus(&dir.0, &addrs);
    wait_for_scrapes(&mut prom, &addrs);

    let start_t = now_unix();
    thread::sleep(WINDOW);
    let end_t = now_unix();
    // Both tracers must have served for the whole window.
    for (t, name) in [(&mut leak_tracer, "leak"), (&mut clean_tracer, "no-leak")] {
        let stderr = t.stderr.clone();
        t.proc.assert_running(&|| format!("(tracing the {name} fixture) stderr:\n{}", stderr.lock().unwrap()));
    }
    let ctx = |pid: &str| {
        let all = prom.query(&format!("{{pid=\"{pid}\",site=\"dial_cache\"}}"));
        format!("\nseries of pid {pid} at dial_cache now: {all:?}")
    };

    // ---- The leaking process: its site rises and is judged a leak.
    let live_q = |pid: &str| {
        format!("sum without (verdict) (leaktrace_live_objects{{kind=\"connection\",site=\"dial_cache\",pid=\"{pid}\"}})")
    };
    let leak_live = prom.query_range(&live_q(&leak_pid), start_t, end_t);
    assert_eq!(leak_live.len(), 1, "one live series for the leaking site expected: {leak_live:?}{}", ctx(&leak_pid));
    let points = &leak_live[0].1;
    eprintln!("leaking site, live objects per second of the window: {:?}", points.iter().map(|p| p.1).collect::<Vec<_>>());
    assert!(points.len() >= 10, "too few points in {WINDOW:?} of 1 s scrapes: {points:?}");
    let (first, mid, last) = first_mid_last(points);
    // 20 leaked connections a second: about 300 over the window.
    assert!(
        mid > first + 30.0 && last > mid + 30.0 && last - first >= 100.0,
        "the leaking site's live objects do not rise over the window: first {first}, mid {mid}, last {last}: {points:?}"
    );
    let leak_now = prom.query(&format!(
        "leaktrace_live_objects{{kind=\"connection\",site=\"dial_cache\",pid=\"{leak_pid}\",verdict=\"leak\"}}"
    ));
    assert_eq!(leak_now.len(), 1, "no verdict=\"leak\" series for the leaking site{}", ctx(&leak_pid));
    assert!(value(&leak_now[0]["value"]) >= last - 50.0, "{leak_now:?} vs last {last}");
    let growth = prom.query_one(&format!(
        "sum without (verdict) (leaktrace_growth_per_minute{{kind=\"connection\",site=\"dial_cache\",pid=\"{leak_pid}\"}})"
    ));
    assert!(growth > 300.0, "growth of the leaking site too small: {growth}/min{}", ctx(&leak_pid));
    let leak_findings = prom.query_one(&format!(
        "max_over_time(leaktrace_findings{{kind=\"connection\",verdict=\"leak\",pid=\"{leak_pid}\"}}[1m])"
    ));
    assert!(leak_findings >= 1.0, "leaktrace_findings never counted the leak{}", ctx(&leak_pid));
    let events = prom.query_one(&format!("increase(leaktrace_events_total{{kind=\"connection\",pid=\"{leak_pid}\"}}[10s])"));
    assert!(events > 0.0, "events counter does not move");

    // ---- The look-alike: the same site (its pool), flat, never a leak.
    let clean_live = prom.query_range(&live_q(&clean_pid), start_t, end_t);
    assert_eq!(clean_live.len(), 1, "one live series for the look-alike expected: {clean_live:?}{}", ctx(&clean_pid));
    let points = &clean_live[0].1;
    eprintln!("look-alike, live objects per second of the window: {:?}", points.iter().map(|p| p.1).collect::<Vec<_>>());
    assert!(points.len() >= 10, "too few points: {points:?}");
    let values: Vec<f64> = points.iter().map(|p| p.1).collect();
    let max = values.iter().cloned().fold(f64::MIN, f64::max);
    // The pool may open (0 -> 4) early in the window; after that it is 4 plus 0..2 churn.
    let later_min = values[values.len() / 2..].iter().cloned().fold(f64::MAX, f64::min);
    assert!(
        max <= 8.0 && max - later_min <= 3.0,
        "the look-alike's live objects are not flat (a pool of 4 plus churn): {points:?}"
    );
    let (first, _, last) = first_mid_last(points);
    assert!(last - first <= 5.0, "the look-alike rises: first {first}, last {last}");
    let range = format!("{}s", (end_t - start_t + 30.0).ceil() as u64);
    for family in ["leaktrace_live_objects", "leaktrace_growth_per_minute"] {
        let leaks = prom.query(&format!("count_over_time({family}{{pid=\"{clean_pid}\",verdict=\"leak\"}}[{range}])"));
        assert!(leaks.is_empty(), "the look-alike carried verdict=\"leak\" on {family}: {leaks:?}");
    }
    let clean_findings =
        // Summed over kinds: with connections and tasks tracked, each kind has its series.
        prom.query_one(&format!("sum(max_over_time(leaktrace_findings{{verdict=\"leak\",pid=\"{clean_pid}\"}}[{range}]))"));
    assert_eq!(clean_findings, 0.0, "the look-alike had a leak finding");
}
