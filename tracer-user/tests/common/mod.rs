//! Helpers for integration tests: start fixtures, run the real `leaktrace`,
//! read its JSON reports. The tests load real eBPF programs (root needed).
#![allow(dead_code)]

pub mod prom;

use std::{
    io::{BufRead, BufReader, Read},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

/// The `leaktrace` binary cargo built for these tests.
pub fn leaktrace() -> PathBuf {
    std::env::var_os("LEAKTRACE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_leaktrace")))
}

/// A fixture binary; built by `cargo xtask fixtures` (part of `cargo xtask test`).
pub fn fixture(name: &str) -> PathBuf {
    let dir = std::env::var_os("LEAKTRACE_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/bin"));
    let p = dir.join(name);
    assert!(p.exists(), "fixture {} missing: run `cargo xtask test` (it builds fixtures)", p.display());
    p
}

/// A running fixture; killed on drop.
pub struct Target {
    pub child: Child,
    /// Lines it printed before `ready`.
    pub banner: Vec<String>,
}

impl Target {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts a fixture and waits for its `ready` line.
pub fn start(name: &str, args: &[&str]) -> Target {
    start_path(&fixture(name), args)
}

/// Starts the program at `path` (a fixture's copy) and waits for `ready`.
pub fn start_path(path: &std::path::Path, args: &[&str]) -> Target {
    let mut cmd = Command::new(path);
    cmd.args(args);
    start_command(cmd)
}

/// Starts a fixture under `sh -c 'ulimit -n N; exec FIXTURE ARGS'` (the
/// fd limit the target runs with) and waits for its `ready` line.
pub fn start_with_fd_limit(name: &str, limit: u32, args: &[&str]) -> Target {
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(format!("ulimit -n {limit} && exec \"$0\" \"$@\"")).arg(fixture(name)).args(args);
    start_command(cmd)
}

/// Starts a command that runs a fixture (from another path, in a namespace)
/// and waits for its `ready` line.
pub fn start_command(mut cmd: Command) -> Target {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    // A fixture copy written by this test can be "busy" for a moment: a
    // child another test thread forks meanwhile holds its write descriptor
    // until that child execs (ETXTBSY). Try again briefly.
    let mut tries = 0;
    let mut child = loop {
        match cmd.spawn() {
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy && tries < 100 => {
                tries += 1;
                thread::sleep(Duration::from_millis(10));
            }
            r => break r.expect("start fixture"),
        }
    };
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        let mut banner = Vec::new();
        for line in lines.by_ref() {
            let Ok(line) = line else { break };
            if line.trim() == "ready" {
                let _ = tx.send(banner.clone());
                break;
            }
            banner.push(line);
        }
        // Keep draining so the fixture never blocks on a full pipe.
        for _ in lines {}
    });
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(banner) => Target { child, banner },
        Err(e) => {
            // Say why: the fixture's exit status and what it printed on stderr.
            let _ = child.kill();
            let status = child.wait().map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
            let mut stderr = String::new();
            if let Some(mut err) = child.stderr.take() {
                use std::io::Read;
                let _ = err.read_to_string(&mut stderr);
            }
            panic!("fixture never printed ready ({e:?}; {status}); its stderr:\n{stderr}");
        }
    }
}

/// What a finished leaktrace run printed.
pub struct Run {
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// JSON reports, one per line.
    pub fn reports(&self) -> Vec<Value> {
        self.stdout
            .lines()
            .filter(|l| l.starts_with('{'))
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l}: {e}")))
            .collect()
    }

    /// The last (final) report.
    pub fn final_report(&self) -> Value {
        let reports = self.reports();
        let last = reports.last().unwrap_or_else(|| panic!("no report; stderr:\n{}", self.stderr)).clone();
        assert_eq!(last["final"], true, "last line is not the final report");
        last
    }
}

/// Runs leaktrace to completion (with a generous timeout).
pub fn run_leaktrace(args: &[&str]) -> Run {
    let mut child = Command::new(leaktrace())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start leaktrace");
    let out = read_all(child.stdout.take().unwrap());
    let err = read_all(child.stderr.take().unwrap());
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("leaktrace did not finish in time");
        }
        thread::sleep(Duration::from_millis(50));
    };
    Run { status: status.code().unwrap_or(-1), stdout: out.join().unwrap(), stderr: err.join().unwrap() }
}

pub fn read_all(mut r: impl Read + Send + 'static) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut s = String::new();
        let _ = r.read_to_string(&mut s);
        s
    })
}

/// Function names of a finding's stack, innermost first.
pub fn functions(finding: &Value) -> Vec<String> {
    finding["stack"]
        .as_array()
        .map(|a| a.iter().map(|f| f["function"].as_str().unwrap_or("").to_string()).collect())
        .unwrap_or_default()
}

/// Findings whose stack contains `func`.
pub fn findings_with<'a>(report: &'a Value, func: &str) -> Vec<&'a Value> {
    report["findings"]
        .as_array()
        .map(|a| a.iter().filter(|f| functions(f).iter().any(|n| n == func)).collect())
        .unwrap_or_default()
}

/// One-line summary of a report for assertion messages.
pub fn summarize(report: &Value) -> String {
    let mut s = String::new();
    for f in report["findings"].as_array().into_iter().flatten() {
        let funcs = functions(f);
        s.push_str(&format!(
            "\n  {} {} via={} live={} growth={} created={} ended={} stack={:?}",
            f["verdict"], f["site"], f["via"], f["live"], f["growth_per_min"], f["created"], f["ended"], &funcs[..funcs.len().min(12)]
        ));
    }
    s
}

/// A free TCP port on loopback (bound, then released for a server to take).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0").local_addr().unwrap().port()
}

/// A real server the test started (redis-server, etcd); killed on drop.
pub struct Server {
    pub child: Child,
    pub addr: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts Debian's `redis-server` on a free loopback port, without
/// persistence, and waits until it accepts connections.
pub fn start_redis() -> Server {
    start_redis_try(0)
}

/// One try at starting redis-server on a free port (a new port per try).
fn start_redis_try(tries: u32) -> Server {
    let port = free_port();
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start redis-server (installed by `cargo xtask setup`)");
    let addr = format!("127.0.0.1:{port}");
    let mut server = Server { child, addr: addr.clone() };
    // Ready means: our redis-server is alive and answers PING on the port
    // (a bare connect could reach another test's server or a self-connect
    // when the port was taken between free_port() and redis' bind).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(Some(status)) = server.child.try_wait() {
            if tries < 3 {
                return start_redis_try(tries + 1);
            }
            panic!("redis-server on {addr} exited: {status}");
        }
        if redis_answers_ping(&addr) {
            return server;
        }
        assert!(Instant::now() < deadline, "redis-server did not answer PING on {addr}");
        thread::sleep(Duration::from_millis(20));
    }
}

/// Whether a redis server at `addr` answers `PING` with `+PONG`.
fn redis_answers_ping(addr: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 7];
    s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

/// The one line a failed run printed on stderr (asserts there is one).
pub fn error_line(run: &Run) -> String {
    let lines: Vec<&str> = run.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected exactly one line on stderr, got:\n{}", run.stderr);
    lines[0].to_string()
}

/// A raw HTTP/1.1 GET (`Connection: close`): the whole response.
pub fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// A real etcd the test started: its client address; killed and its data
/// directory removed on drop.
pub struct Etcd {
    pub server: Server,
    data_dir: PathBuf,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.server.child.kill();
        let _ = self.server.child.wait();
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}

/// Starts Debian's `etcd` (a one-member cluster) on free loopback client
/// and peer ports with a data directory of its own, and waits until it
/// answers `/health`.
pub fn start_etcd() -> Etcd {
    let (client, peer) = (free_port(), free_port());
    let data_dir = std::env::temp_dir().join(format!("leaktrace-etcd-{}-{client}", std::process::id()));
    let client_url = format!("http://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let child = Command::new("etcd")
        .args(["--name", "leaktrace-test", "--data-dir"])
        .arg(&data_dir)
        .args(["--listen-client-urls", &client_url, "--advertise-client-urls", &client_url])
        .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
        .args(["--initial-cluster", &format!("leaktrace-test={peer_url}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start etcd (package etcd-server, installed by `cargo xtask setup`)");
    let addr = format!("127.0.0.1:{client}");
    let mut etcd = Etcd { server: Server { child, addr: addr.clone() }, data_dir };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(Some(status)) = etcd.server.child.try_wait() {
            panic!("etcd on {addr} exited: {status}");
        }
        if std::net::TcpStream::connect(&addr).is_ok() && http_get(&addr, "/health").contains("\"health\":\"true\"") {
            return etcd;
        }
        assert!(Instant::now() < deadline, "etcd did not answer /health on {addr}");
        thread::sleep(Duration::from_millis(50));
    }
}
