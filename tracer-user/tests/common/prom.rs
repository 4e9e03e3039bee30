//! A real Prometheus server for tests (Debian's `prometheus` package,
//! installed by `cargo xtask setup`), the processes and directories a test
//! starts (stopped and removed on drop), and a small HTTP client.

use std::{
    fs,
    io::{Read, Write},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde_json::Value;

use super::free_port;

pub const PROMETHEUS: &str = "/usr/bin/prometheus";

/// A child process stopped on drop (SIGTERM, then SIGKILL after 5 s), so
/// that nothing outlives the test, whether it passes or panics.
pub struct Proc {
    pub name: &'static str,
    pub child: Child,
}

impl Proc {
    /// Panics (with `log`) if the process has already exited.
    pub fn assert_running(&mut self, log: &dyn Fn() -> String) {
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
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
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

pub fn now_unix() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

// ------------------------------------------------------------ HTTP client

/// Percent-encodes a query parameter value.
pub fn encode(s: &str) -> String {
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
pub fn http_get_status(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
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
pub struct Prometheus {
    pub addr: String,
    pub log: PathBuf,
    pub proc: Proc,
}

impl Prometheus {
    pub fn log(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// `GET /api/v1/<endpoint>?params`: the `data` of a successful answer.
    pub fn api(&self, endpoint: &str, params: &[(&str, &str)]) -> Value {
        let query: Vec<String> = params.iter().map(|(k, v)| format!("{k}={}", encode(v))).collect();
        let path = format!("/api/v1/{endpoint}?{}", query.join("&"));
        let (status, body) = http_get_status(&self.addr, &path).unwrap_or_else(|e| panic!("GET {path}: {e}"));
        let v: Value =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {status}, not JSON ({e}): {body}"));
        assert_eq!(v["status"], "success", "GET {path}: {status} {body}");
        v["data"].clone()
    }

    /// An instant query: the result vector.
    pub fn query(&self, q: &str) -> Vec<Value> {
        let data = self.api("query", &[("query", q)]);
        data["result"].as_array().cloned().unwrap_or_default()
    }

    /// An instant query expected to give exactly one sample: its value.
    pub fn query_one(&self, q: &str) -> f64 {
        let r = self.query(q);
        assert_eq!(r.len(), 1, "{q}: expected one series, got {r:?}");
        value(&r[0]["value"])
    }

    /// A range query with a 1 s step: per series, its labels and (time, value) points.
    pub fn query_range(&self, q: &str, start: f64, end: f64) -> Vec<(Value, Vec<(f64, f64)>)> {
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
pub fn value(pair: &Value) -> f64 {
    pair[1].as_str().and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("not a sample: {pair}"))
}

pub fn start_prometheus(dir: &Path, targets: &[&str]) -> Prometheus {
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
pub fn wait_for_scrapes(prom: &mut Prometheus, addrs: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = String::from("(no answer yet)");
    loop {
        let log = prom.log();
        prom.proc.assert_running(&|| log.clone());
        if let Ok((200, body)) = http_get_status(&prom.addr, "/api/v1/targets") {
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

