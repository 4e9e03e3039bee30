//! The fd tracker and the time to exhaustion, end to end: the real
//! `leaktrace` against `fd_leak` (fixtures/c/fd_leak.c), which leaks an
//! fopen'd log file and the write end of a pipe per request beside a
//! function that fopens and fcloses the same way, under `ulimit -n 2048`
//! (needs root).

mod common;

use std::time::Instant;

use common::*;
use serde_json::Value;

const FD_LIMIT: u64 = 2048;

fn fd_count(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count() as u64).unwrap_or(0)
}

fn site<'a>(report: &'a Value, func: &str) -> &'a Value {
    let found = findings_with(report, func);
    assert_eq!(found.len(), 1, "{func}: expected one finding:{}", summarize(report));
    assert_eq!(found[0]["site"], func, "{func}: wrong site:{}", summarize(report));
    found[0]
}

#[test]
fn fd_leaks_are_named_with_type_path_and_time_to_exhaustion() {
    let dir = tempdir();
    let t = start_with_fd_limit("fd_leak", FD_LIMIT as u32, &["--dir", &dir, "--rate", "20"]);
    let pid = t.pid();
    let (fds_before, t0) = (fd_count(pid), Instant::now());
    let run = run_leaktrace(&[
        "check", "--pid", &pid.to_string(), "--for", "12s", "--interval", "2s", "--json", "--track", "fds",
        "--fail-within", "10m",
    ]);
    // The fd rate measured from /proc alone, over the same time.
    let (fds_after, secs) = (fd_count(pid), t0.elapsed().as_secs_f64());
    let rate = (fds_after - fds_before) as f64 / secs;
    assert_eq!(run.status, 3, "leaks and an fd limit reached within 10m must exit 3; stderr:\n{}", run.stderr);
    let report = run.final_report();
    let all = summarize(&report);

    let log = site(&report, "append_access_log");
    assert_eq!(log["kind"], "fd", "{all}");
    assert_eq!(log["verdict"], "leak", "{all}");
    assert_eq!(log["fd_type"], "file", "{all}");
    assert_eq!(log["path"], format!("{dir}/access.log"), "{all}");
    assert_eq!(log["distinct_paths"], 1, "{all}");
    assert_eq!(functions(log).iter().position(|f| f == "append_access_log").map(|i| functions(log)[i + 1].clone()).as_deref(), Some("handle_request"), "{all}");
    let pipe = site(&report, "notify_worker");
    assert_eq!(pipe["verdict"], "leak", "{all}");
    assert_eq!(pipe["fd_type"], "pipe", "{all}");
    // One write end per request: about as many as log files.
    let (nl, np) = (log["live"].as_u64().unwrap(), pipe["live"].as_u64().unwrap());
    assert!(nl >= 150 && np + 10 >= nl && np <= nl + 10, "log {nl} vs pipe {np}:{all}");
    // The look-alike: the same fopen, then fclose.
    for f in findings_with(&report, "read_config") {
        assert_ne!(f["verdict"], "leak", "read_config closes its files:{all}");
    }

    // Time to exhaustion against the limit the target runs with.
    let e = &report["exhaustion"];
    assert_eq!(e["resource"], "open files", "{all}\n{e}");
    assert_eq!(e["limit_source"], "RLIMIT_NOFILE");
    assert_eq!(e["limit"], FD_LIMIT);
    // Read at the final report, before leaktrace detached and the test read /proc.
    let in_use = e["in_use"].as_u64().unwrap();
    assert!(in_use <= fds_after && in_use > fds_before, "in use {in_use}: /proc said {fds_before} before, {fds_after} after");
    let expected = (FD_LIMIT - in_use) as f64 / rate;
    let eta = e["seconds"].as_f64().unwrap();
    assert!((eta - expected).abs() <= 0.3 * expected, "ETA {eta} s, expected {expected:.0} s (rate {rate:.1}/s)");
    let share = e["share"].as_f64().unwrap();
    assert!((0.35..=0.65).contains(&share), "two sites leak alike: share {share}");
    // Per finding: the site's own slope.
    let own = log["exhausts"]["seconds"].as_f64().unwrap();
    assert!((own - 2.0 * expected).abs() <= 0.3 * 2.0 * expected, "site ETA {own}, expected {:.0}", 2.0 * expected);
    assert!(run.stderr.contains("runs out of open files in"), "{}", run.stderr);
}

/// A fresh directory for the fixture's files.
fn tempdir() -> String {
    let d = std::env::temp_dir().join(format!("leaktrace-fds-{}-{}", std::process::id(), rand_suffix()));
    std::fs::create_dir_all(&d).unwrap();
    d.to_string_lossy().into_owned()
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() % 1_000_000
}

fn attach_fds(pid: u32, dur: &str) -> Run {
    let run = run_leaktrace(&["attach", "--pid", &pid.to_string(), "--for", dur, "--interval", "1s", "--json", "--track", "fds"]);
    assert_eq!(run.status, 0, "stderr: {}", run.stderr);
    run
}

fn num(f: &Value, field: &str) -> u64 {
    f[field].as_u64().unwrap_or_else(|| panic!("{field} is not a count in {f}"))
}

/// Every kind of fd and every way one ends (fixtures/c/fd_kinds.c): the
/// kept ones leak with their type, the ended ones do not.
#[test]
fn fd_kinds_and_the_ways_they_end() {
    let t = start("fd_kinds", &[]);
    let run = attach_fds(t.pid(), "6s");
    let report = run.final_report();
    let all = summarize(&report);
    assert_eq!(report["lost"]["events"], 0, "{all}");
    for (func, ty) in [("kept_eventfd", "eventfd"), ("receive_socket", "socket"), ("cloexec_kept", "file"), ("plain_kept", "file")] {
        let f = site(&report, func);
        assert_eq!(f["verdict"], "leak", "{func}:{all}");
        assert_eq!(f["fd_type"], ty, "{func}:{all}");
        // 20 per second, never closed.
        assert!(num(f, "live") >= 80 && num(f, "ended") == 0, "{func}:{all}");
        // The walk goes on past the function that made the fd.
        assert!(functions(f).iter().any(|n| n == "iteration"), "{func}: stack ends early:{all}");
    }
    assert_eq!(site(&report, "cloexec_kept")["path"], "/dev/zero", "{all}");
    // Ended by dup2 (over them), by close_range (pipes; the dups), churned by close.
    for (func, ty) in [("ended_by_dup2", "file"), ("end_by_dup2", "file"), ("ended_by_close_range", "pipe")] {
        if let Some(f) = findings_with(&report, func).into_iter().find(|f| f["site"] == func) {
            assert_ne!(f["verdict"], "leak", "{func}:{all}");
            assert_eq!(f["fd_type"], ty, "{func}:{all}");
            assert!(num(f, "live") <= 3 && num(f, "created") >= 80, "{func}:{all}");
        }
    }
    for f in findings_with(&report, "churn_event_fds") {
        assert_ne!(f["verdict"], "leak", "churn_event_fds closes everything:{all}");
    }
    // epoll + eventfd + timerfd churn: 6 events per iteration at least.
    assert!(report["events"]["fd"].as_u64().unwrap() > 1500, "{all}");
}

/// exec ends the fds made CLOEXEC before it, and only those.
#[test]
fn exec_ends_cloexec_fds_only() {
    let t = start("fd_kinds", &["--exec-after-ms", "4000"]);
    let run = attach_fds(t.pid(), "8s");
    let report = run.final_report();
    let all = summarize(&report);
    assert_eq!(report["comm"], "sleep", "{all}");
    // Before the exec the CLOEXEC site was tracked and growing (else
    // leaktrace attached too late, after the exec).
    let before = run.reports().iter().flat_map(|r| findings_with(r, "cloexec_kept").into_iter().map(|f| num(f, "live")).collect::<Vec<_>>()).max();
    assert!(before.is_some_and(|n| n >= 20), "cloexec_kept never seen live before the exec:{all}");
    if let Some(f) = findings_with(&report, "cloexec_kept").first() {
        assert_eq!(num(f, "live"), 0, "CLOEXEC fds live after exec:{all}");
    }
    let plain = site(&report, "plain_kept");
    assert!(num(plain, "live") >= 40 && num(plain, "ended") == 0, "plain fds survive exec:{all}");
}

/// A Go program leaking os.Open'd files (kept reachable, so no finalizer
/// closes them) beside a handler that opens and closes, and one that drops
/// its files unclosed (Go's finalizers close them at GCs: `unclosed`).
#[test]
fn go_os_open_leak_is_found() {
    let dir = tempdir();
    let t = start("fdleak-go", &["-dir", &dir]);
    let run = attach_fds(t.pid(), "7s");
    let report = run.final_report();
    let all = summarize(&report);
    let f = site(&report, "main.openSession");
    assert_eq!(f["verdict"], "leak", "{all}");
    assert_eq!(f["fd_type"], "file", "{all}");
    assert_eq!(f["path"], format!("{dir}/session.db"), "{all}");
    assert!(num(f, "live") >= 80, "{all}");
    for f in findings_with(&report, "main.readSettings") {
        assert_ne!(f["verdict"], "leak", "readSettings closes its files:{all}");
        assert_ne!(f["verdict"], "unclosed", "readSettings closes its files:{all}");
        assert_eq!(f["ended_by_finalizer"], 0, "{all}");
    }
    let dropped = site(&report, "main.loadTemplate");
    assert_eq!(dropped["verdict"], "unclosed", "{all}");
    assert_eq!(dropped["path"], format!("{dir}/template.html"), "{all}");
    let by_finalizer = num(dropped, "ended_by_finalizer");
    assert!(by_finalizer >= 5 && by_finalizer * 2 > num(dropped, "ended"), "{all}");
    assert_eq!(num(f, "ended_by_finalizer"), 0, "kept files are never finalized:{all}");
}
