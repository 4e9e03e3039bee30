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
    assert!(in_use <= fds_after && in_use as f64 >= fds_after as f64 - 6.0 * rate, "in use {in_use} vs /proc {fds_after} later");
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
