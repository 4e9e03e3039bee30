//! The thread tracker end to end: the real `leaktrace` against a C program
//! with a planted thread leak and busy look-alikes (needs root).

mod common;

use common::*;

fn trace_threads(fixture: &str, args: &[&str], track: &str) -> serde_json::Value {
    let t = start(fixture, args);
    let pid = t.pid().to_string();
    let run = run_leaktrace(&[
        "attach", "--pid", &pid, "--for", "8s", "--interval", "1s", "--format", "json", "--track", track,
    ]);
    assert_eq!(run.status, 0, "stderr: {}", run.stderr);
    run.final_report()
}

fn leaks(report: &serde_json::Value) -> Vec<&serde_json::Value> {
    report["findings"].as_array().unwrap().iter().filter(|f| f["verdict"] == "leak").collect()
}

#[test]
fn c_thread_leak_is_found_and_lookalikes_are_not() {
    let report = trace_threads("thread_leak", &[], "tasks");
    let all = summarize(&report);
    let leaks = leaks(&report);
    assert_eq!(leaks.len(), 1, "exactly one leak expected:{all}");
    let leak = leaks[0];
    assert_eq!(leak["kind"], "thread", "{all}");
    assert_eq!(leak["thread_name"], "watcher", "{all}");
    // The direct caller of pthread_create (skipped by the frame-pointer walk
    // at the function's entry) is put back, right before its own caller.
    let funcs = functions(leak);
    let at = funcs.iter().position(|f| f == "spawn_detached").unwrap_or_else(|| panic!("no spawn_detached:{all}"));
    assert_eq!(funcs.get(at + 1).map(String::as_str), Some("start_watcher"), "{all}");
    assert!(leak["live"].as_u64().unwrap() >= 20, "too few live threads:{all}");
    assert!(leak["growth_per_min"].as_f64().unwrap() > 300.0, "growth too small:{all}");
    // Look-alikes: the joined jobs and the fixed pool (same helper as the leak).
    for f in findings_with(&report, "run_job").into_iter().chain(findings_with(&report, "spawn_joined")) {
        assert_ne!(f["verdict"], "leak", "run_job judged a leak:{all}");
    }
    let pool = findings_with(&report, "pool_start");
    assert_eq!(pool.len(), 1, "pool not seen:{all}");
    assert_eq!(pool[0]["verdict"], "steady", "{all}");
    assert_eq!(pool[0]["live"], 4, "{all}");
    assert_eq!(pool[0]["thread_name"], "pool", "{all}");
    // The job churn was seen (hundreds of threads created and ended).
    assert!(report["events"]["thread"].as_u64().unwrap() > 500, "job churn not seen:{all}");
    assert!(report["findings"].as_array().unwrap().iter().all(|f| f["kind"] == "thread"), "{all}");
    assert_eq!(report["lost"]["events"], 0);
    assert_eq!(report["lost"]["stacks"], 0);
}

#[test]
fn c_thread_fixture_without_leak_has_no_leak() {
    let report = trace_threads("thread_leak", &["--no-leak"], "tasks");
    let all = summarize(&report);
    assert!(leaks(&report).is_empty(), "no leak expected:{all}");
    assert!(findings_with(&report, "start_watcher").is_empty(), "{all}");
    assert_eq!(findings_with(&report, "pool_start").len(), 1, "pool not seen:{all}");
}

#[test]
fn connection_leak_is_still_found_with_tasks_tracked() {
    let report = trace_threads("conn_leak", &[], "connections,tasks");
    let all = summarize(&report);
    let leaks = leaks(&report);
    assert_eq!(leaks.len(), 1, "exactly one leak expected:{all}");
    assert_eq!(leaks[0]["kind"], "connection", "{all}");
    assert!(functions(leaks[0]).iter().any(|f| f == "bad_handler"), "{all}");
    assert!(report["events"]["thread"].is_u64(), "thread tracker not running:{all}");
    assert!(report["findings"].as_array().unwrap().iter().all(|f| f["kind"] != "thread" || f["verdict"] != "leak"));
}
