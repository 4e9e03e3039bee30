//! The goroutine tracker end to end: the real `leaktrace` against the Go
//! fixture `goroutineleak` built with several Go versions (one stripped),
//! each with a leaked session keep-alive goroutine per job next to
//! short-lived workers, closed sessions and a fixed pool (needs root).

mod common;

use common::*;
use serde_json::Value;

/// Builds traced in parallel in one test (each trace takes ~10 s).
const BUILDS: &[&str] = &["goroutineleak", "goroutineleak122", "goroutineleak125", "goroutineleak127-stripped"];
const MORE_BUILDS: &[&str] = &["goroutineleak124", "goroutineleak127"];

const SOURCE: &str = include_str!("../../fixtures/go/goroutineleak/main.go");

/// 1-based line of the first source line that is `text` (trimmed).
fn line_of(text: &str) -> u64 {
    SOURCE.lines().position(|l| l.trim() == text).unwrap_or_else(|| panic!("no line {text}")) as u64 + 1
}

struct Traced {
    build: String,
    report: Value,
    stderr: String,
}

/// A memory limit the leak's time to exhaustion is judged against.
const GOMEMLIMIT: &str = "4GiB";

fn trace(build: &str, args: &[&str], secs: u32) -> Traced {
    let mut cmd = std::process::Command::new(fixture(build));
    cmd.args(args).env("GOMEMLIMIT", GOMEMLIMIT);
    let t = start_command(cmd);
    let pid = t.pid().to_string();
    let dur = format!("{secs}s");
    let run = run_leaktrace(&[
        "attach", "--pid", &pid, "--for", &dur, "--interval", "1s", "--format", "json", "--track", "tasks",
    ]);
    assert_eq!(run.status, 0, "{build}: stderr: {}", run.stderr);
    Traced { build: build.into(), report: run.final_report(), stderr: run.stderr }
}

/// Traces every build at once, one thread each.
fn trace_all(builds: &[&str], args: &'static [&'static str]) -> Vec<Traced> {
    let handles: Vec<_> = builds
        .iter()
        .map(|b| {
            let b = b.to_string();
            std::thread::spawn(move || trace(&b, args, 10))
        })
        .collect();
    handles.into_iter().map(|h| h.join().expect("trace thread panicked")).collect()
}

fn goroutine_findings(report: &Value) -> Vec<&Value> {
    report["findings"].as_array().unwrap().iter().filter(|f| f["kind"] == "goroutine").collect()
}

fn blocked_functions(f: &Value) -> Vec<String> {
    f["blocked_in"]
        .as_array()
        .map(|a| a.iter().map(|f| f["function"].as_str().unwrap_or("").to_string()).collect())
        .unwrap_or_default()
}

fn check_leak_found(t: &Traced) {
    let b = &t.build;
    let report = &t.report;
    let all = summarize(report);
    assert!(t.stderr.contains("tracking goroutines"), "{b}: {}", t.stderr);
    let leaks: Vec<_> = report["findings"].as_array().unwrap().iter().filter(|f| f["verdict"] == "leak").collect();
    assert_eq!(leaks.len(), 1, "{b}: exactly one leak expected:{all}");
    let leak = leaks[0];
    assert_eq!(leak["kind"], "goroutine", "{b}:{all}");
    // Grouped by the `go` statement: the creating function, its file:line.
    assert_eq!(leak["site"], "main.NewSession", "{b}:{all}");
    let frame = &leak["stack"][0];
    assert_eq!(frame["function"], "main.NewSession", "{b}:{all}");
    assert!(frame["file"].as_str().is_some_and(|f| f.ends_with("goroutineleak/main.go")), "{b}: {frame}");
    assert_eq!(frame["line"], line_of("go s.keepAlive()"), "{b}: {frame}");
    assert!(leak["live"].as_u64().unwrap() >= 50, "{b}: too few live goroutines:{all}");
    assert!(leak["growth_per_min"].as_f64().unwrap() > 300.0, "{b}: growth too small:{all}");
    // Where they are stuck now, as in a goroutine dump.
    assert_eq!(leak["wait_reason"], "select", "{b}: {leak}");
    let blocked = blocked_functions(leak);
    assert!(blocked.iter().any(|f| f == "main.(*Session).keepAlive"), "{b}: blocked_in {blocked:?}");
    assert_eq!(blocked.first().map(String::as_str), Some("runtime.gopark"), "{b}: blocked_in {blocked:?}");
    // Each leaked goroutine holds at least the smallest stack: memory runs
    // out (GOMEMLIMIT, or a tighter cgroup limit) at that rate.
    assert!(leak["bytes_per_object"].as_u64().unwrap() >= 2048, "{b}: {leak}");
    assert_eq!(leak["exhausts"]["resource"], "memory", "{b}: {leak}");
    assert!(leak["exhausts"]["limit"].as_u64().unwrap() <= 4 << 30, "{b}: {leak}");
    // Look-alikes: the workers and the pool are not leaks.
    for f in goroutine_findings(report) {
        if f["site"] != "main.NewSession" {
            assert_ne!(f["verdict"], "leak", "{b}: {} judged a leak:{all}", f["site"]);
            assert!(f.get("blocked_in").is_none(), "{b}: blocked_in on a non-leak: {f}");
        }
    }
    let pool: Vec<_> = goroutine_findings(report).into_iter().filter(|f| f["site"] == "main.startPool").collect();
    assert_eq!(pool.len(), 1, "{b}: pool not seen:{all}");
    assert_eq!(pool[0]["verdict"], "steady", "{b}:{all}");
    assert_eq!(pool[0]["live"], 4, "{b}:{all}");
    // The worker churn was seen (a fraction of it: scans are 1 s apart).
    assert!(report["events"]["goroutine"].as_u64().unwrap() > 50, "{b}: churn not seen:{all}");
    assert!(report["events"]["thread"].is_u64(), "{b}: thread tracker not running:{all}");
    assert_eq!(report["lost"]["events"], 0, "{b}");
}

#[test]
fn goroutine_leak_is_found_on_each_go_version_and_stripped() {
    for t in trace_all(BUILDS, &[]) {
        check_leak_found(&t);
    }
}

#[test]
fn goroutine_leak_is_found_on_go124_and_go127() {
    for t in trace_all(MORE_BUILDS, &[]) {
        check_leak_found(&t);
    }
}

#[test]
fn goroutine_fixture_without_leak_has_no_leak() {
    for t in trace_all(&["goroutineleak", "goroutineleak127-stripped"], &["-no-leak"]) {
        let all = summarize(&t.report);
        assert!(
            t.report["findings"].as_array().unwrap().iter().all(|f| f["verdict"] != "leak"),
            "{}: no leak expected:{all}",
            t.build
        );
        assert!(goroutine_findings(&t.report).iter().any(|f| f["site"] == "main.startPool"), "{}:{all}", t.build);
    }
}

/// A Go version leaktrace has no layout for (no DWARF to read it from):
/// one clear line, and the thread tracker still runs.
#[test]
fn unsupported_go_version_is_said_and_threads_still_run() {
    let mut data = std::fs::read(fixture("goroutineleak127-stripped")).unwrap();
    let magic = b"\xff Go buildinf:";
    let at = data.windows(magic.len()).position(|w| w == magic).expect("no buildinfo");
    let v = at + data[at..].windows(8).position(|w| w == b"go1.27.3").expect("no version string");
    data[v..v + 8].copy_from_slice(b"go1.99.3");
    let dir = std::env::temp_dir().join(format!("leaktrace-go199-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("goroutineleak199");
    std::fs::write(&path, &data).unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    // Started here, not with `start` (which only runs fixtures/bin).
    let mut child = std::process::Command::new(&path)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert_eq!(line.trim(), "ready");
    let pid = child.id().to_string();
    let run = run_leaktrace(&["attach", "--pid", &pid, "--for", "3s", "--interval", "1s", "--format", "json", "--track", "tasks"]);
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(run.status, 0, "stderr: {}", run.stderr);
    let t = Traced { build: "go1.99".into(), report: run.final_report(), stderr: run.stderr };
    let lines: Vec<_> = t.stderr.lines().filter(|l| l.contains("goroutines not tracked")).collect();
    assert_eq!(lines.len(), 1, "stderr: {}", t.stderr);
    assert!(lines[0].contains("go1.99.3"), "{}", lines[0]);
    assert!(t.report["events"]["thread"].is_u64(), "thread tracker not running: {}", t.report);
    assert!(t.report["events"].get("goroutine").is_none(), "{}", t.report);
}

/// A library's `go` statements leak (etcd's `concurrency.NewSession` and
/// `(*lessor).KeepAlive`, Debian's etcd client against a real etcd): one
/// function forgets `Session.Close`, another calls the same library and
/// closes. While the groups are judged a leak, the creator probe on each
/// statement's `CALL runtime.newproc` learns who runs it, and the findings
/// name the forgetting function with the library as `via`; the look-alike
/// is never named, and its twin without the bug passes `check`.
#[test]
fn library_go_statement_leak_names_the_function_that_forgot_close() {
    let etcd = start_etcd();
    let endpoint = etcd.server.addr.clone();
    let (leaky, quiet) = std::thread::scope(|s| {
        let run = |args: &'static [&'static str]| {
            let endpoint = endpoint.clone();
            s.spawn(move || {
                let mut all = vec!["-endpoint", endpoint.as_str()];
                all.extend_from_slice(args);
                let t = start("etcd-session", &all);
                let pid = t.pid().to_string();
                run_leaktrace(&["check", "--pid", &pid, "--for", "14s", "--interval", "2s", "--format", "json", "--track", "tasks"])
            })
        };
        let (a, b) = (run(&[]), run(&["-no-leak"]));
        (a.join().unwrap(), b.join().unwrap())
    });
    assert_eq!(leaky.status, 3, "stderr: {}", leaky.stderr);
    let report = leaky.final_report();
    let all = summarize(&report);
    let leaks: Vec<_> = goroutine_findings(&report).into_iter().filter(|f| f["verdict"] == "leak").collect();
    assert!(!leaks.is_empty(), "{all}");
    for f in &leaks {
        assert_eq!(f["site"], "main.acquireJobLock", "{all}");
        assert_eq!(f["via"], "go.etcd.io/etcd/clientv3/concurrency.NewSession", "{all}");
        assert!(functions(f).iter().any(|n| n == "main.runJob"), "{all}");
    }
    assert!(leaks.iter().any(|f| functions(f)[0] == "go.etcd.io/etcd/clientv3/concurrency.NewSession"), "{all}");
    assert!(leaks.iter().any(|f| functions(f)[0] == "go.etcd.io/etcd/clientv3.(*lessor).KeepAlive"), "{all}");
    assert!(!all.contains("main.renewLease"), "the look-alike was named:{all}");
    assert!(
        leaky.stderr.contains("LEAK goroutine at main.acquireJobLock via go.etcd.io/etcd/clientv3/concurrency.NewSession"),
        "{}",
        leaky.stderr
    );
    assert!(leaky.stderr.contains("creator probes on 2 library go statements"), "{}", leaky.stderr);
    assert_eq!(quiet.status, 0, "stderr: {}", quiet.stderr);
    drop(etcd);
}
