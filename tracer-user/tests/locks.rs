//! The lock tracker end to end: the real `leaktrace` against C and Go
//! programs with one hot lock next to quiet look-alikes, a condition
//! variable, a join and an rwlock (needs root).

mod common;

use common::*;
use serde_json::Value;

fn trace_locks(fixture: &str, args: &[&str]) -> Value {
    let t = start(fixture, args);
    let pid = t.pid().to_string();
    let run = run_leaktrace(&[
        "attach", "--pid", &pid, "--for", "6s", "--interval", "1s", "--format", "json", "--track", "locks",
    ]);
    assert_eq!(run.status, 0, "stderr: {}", run.stderr);
    run.final_report()
}

fn lock_findings(report: &Value) -> Vec<&Value> {
    report["findings"].as_array().unwrap().iter().filter(|f| f["kind"] == "lock").collect()
}

fn by_name<'a>(report: &'a Value, lock: &str) -> Option<&'a Value> {
    lock_findings(report).into_iter().find(|f| f["lock"] == lock)
}

fn holder_functions(f: &Value) -> Vec<String> {
    f["holder_stack"]
        .as_array()
        .map(|a| a.iter().map(|f| f["function"].as_str().unwrap_or("").to_string()).collect())
        .unwrap_or_default()
}

fn locks_summary(report: &Value) -> String {
    lock_findings(report)
        .iter()
        .map(|f| {
            format!(
                "\n  {} {} kind={} waits={} share={} site={} stack={:?} holder={:?}",
                f["verdict"], f["lock"], f["lock_kind"], f["contentions"], f["wait_share"], f["site"],
                functions(f),
                holder_functions(f)
            )
        })
        .collect()
}

#[test]
fn c_hot_lock_is_named_with_waiters_and_holders_and_lookalikes_are_not() {
    let report = trace_locks("lock_contention", &[]);
    let all = locks_summary(&report);
    let locks = lock_findings(&report);
    assert!(!locks.is_empty(), "no lock findings:{all}");
    let hot = locks[0];
    assert_eq!(hot["lock"], "hot_lock", "hot lock is not the top finding:{all}");
    assert_eq!(hot["verdict"], "contended", "{all}");
    assert_eq!(hot["lock_kind"], "mutex", "{all}");
    // The function that called pthread_mutex_lock (lost by a frame-pointer
    // walk inside glibc) is in the waiters' stack, then its caller.
    let funcs = functions(hot);
    let at = funcs.iter().position(|f| f == "update_hot_counter").unwrap_or_else(|| panic!("waiter stack:{all}"));
    assert_eq!(funcs.get(at + 1).map(String::as_str), Some("hot_worker"), "{all}");
    assert!(holder_functions(hot).iter().any(|f| f == "update_hot_counter"), "holder stack:{all}");
    assert!(hot["contentions"].as_u64().unwrap() > 1000, "{all}");
    assert!(hot["wait_share"].as_f64().unwrap() > 0.2, "{all}");
    assert!(hot["max_wait_ns"].as_u64().unwrap() <= hot["wait_ns"].as_u64().unwrap());
    let hist = hot["wait_histogram"].as_array().unwrap();
    assert_eq!(hist.last().unwrap()["count"], hot["contentions"], "histogram is cumulative:{all}");

    // The quiet look-alike: rarely contended, never "contended".
    if let Some(q) = by_name(&report, "quiet_lock") {
        assert_eq!(q["verdict"], "steady", "{all}");
    }
    // Condition-variable waits (20 ms each, all the time) and joins are not
    // mutex contention; only the condvar's mutex, re-taken after a wakeup,
    // may show as a (small) mutex wait.
    for f in &locks {
        assert!(!functions(f).iter().any(|n| n == "join_sleeper"), "join reported:{all}");
        assert_ne!(f["lock"], "work_ready", "condition variable reported:{all}");
        if functions(f).iter().any(|n| n == "wait_for_work") {
            assert_eq!(f["lock"], "cond_mutex", "{all}");
            assert_eq!(f["verdict"], "steady", "condvar waits counted as mutex waits:{all}");
        }
    }
    // The rwlock: readers wait for the writer, who is the holder.
    let table = by_name(&report, "table_lock").unwrap_or_else(|| panic!("rwlock not seen:{all}"));
    assert_eq!(table["lock_kind"], "rwlock", "{all}");
    assert!(functions(table).iter().any(|f| f == "read_table" || f == "write_table"), "{all}");
    assert!(holder_functions(table).iter().any(|f| f == "write_table" || f == "read_table"), "{all}");
    assert!(report["events"]["lock"].as_u64().unwrap() > 1000, "{all}");
    assert_eq!(report["lost"]["events"], 0, "{all}");
}

#[test]
fn c_without_hot_contention_has_no_contended_hot_lock() {
    let report = trace_locks("lock_contention", &["--no-hot"]);
    let all = locks_summary(&report);
    if let Some(hot) = by_name(&report, "hot_lock") {
        assert_eq!(hot["verdict"], "steady", "{all}");
    }
    assert!(by_name(&report, "table_lock").is_some(), "tracker not running:{all}");
}

fn go_pool(fixture: &str) {
    let report = trace_locks(fixture, &[]);
    let all = locks_summary(&report);
    let locks = lock_findings(&report);
    assert!(!locks.is_empty(), "{fixture}: no lock findings:{all}");
    let hot = locks[0];
    assert_eq!(hot["lock"], "main.pool", "{fixture}: hot lock is not the top finding:{all}");
    assert_eq!(hot["verdict"], "contended", "{fixture}:{all}");
    assert_eq!(hot["lock_kind"], "go-mutex", "{fixture}:{all}");
    assert!(functions(hot).iter().any(|f| f == "main.(*connPool).borrow"), "{fixture}: waiter stack:{all}");
    assert!(functions(hot).iter().any(|f| f == "main.handler"), "{fixture}: waiter stack:{all}");
    assert!(holder_functions(hot).iter().any(|f| f == "main.(*connPool).borrow"), "{fixture}: holder stack:{all}");
    if let Some(q) = by_name(&report, "main.stats") {
        assert_eq!(q["verdict"], "steady", "{fixture}:{all}");
    }
    if let Some(c) = by_name(&report, "main.config") {
        assert_eq!(c["lock_kind"], "go-rwmutex", "{fixture}:{all}");
    }
    // The Go runtime's own futex locks and parking are not the program's locks.
    assert!(locks.iter().all(|f| f["lock_kind"] != "futex" && f["lock_kind"] != "mutex"), "{fixture}:{all}");
}

#[test]
fn go_119_pool_mutex_is_named_with_waiters_and_holders() {
    go_pool("lockpool-go");
}

#[test]
fn go_124_pool_mutex_is_named_with_waiters_and_holders() {
    go_pool("lockpool-go124");
}

#[test]
fn go_127_pool_mutex_is_named_with_waiters_and_holders() {
    go_pool("lockpool-go127");
}

#[test]
fn go_stripped_binary_still_gets_its_locks() {
    // No symbol table: the probes are placed through `.gopclntab`, frames
    // are named from it too; the lock (a global) is named by its address.
    let report = trace_locks("lockpool-go127-stripped", &[]);
    let all = locks_summary(&report);
    let locks = lock_findings(&report);
    assert!(!locks.is_empty(), "no lock findings:{all}");
    let hot = locks[0];
    assert_eq!(hot["verdict"], "contended", "{all}");
    assert_eq!(hot["lock_kind"], "go-mutex", "{all}");
    assert!(hot["lock"].as_str().unwrap().starts_with("0x"), "{all}");
    assert!(functions(hot).iter().any(|f| f == "main.(*connPool).borrow"), "waiter stack:{all}");
    assert!(holder_functions(hot).iter().any(|f| f == "main.(*connPool).borrow"), "holder stack:{all}");
}

#[test]
fn check_fails_on_wait_share_and_passes_without_contention() {
    let t = start("lock_contention", &[]);
    let pid = t.pid().to_string();
    let run = run_leaktrace(&["check", "--pid", &pid, "--for", "3s", "--track", "locks", "--fail-on-wait", "0.2"]);
    assert_eq!(run.status, 3, "stderr: {}", run.stderr);
    assert!(run.stderr.contains("CONTENDED lock hot_lock"), "stderr: {}", run.stderr);
    drop(t);
    let t = start("lock_contention", &["--no-hot"]);
    let pid = t.pid().to_string();
    let run = run_leaktrace(&["check", "--pid", &pid, "--for", "3s", "--track", "locks", "--fail-on-wait", "0.9"]);
    assert_eq!(run.status, 0, "stderr: {}", run.stderr);
}

#[test]
fn lock_pprof_and_flamegraph_name_the_contending_function() {
    let dir = std::env::temp_dir().join(format!("leaktrace-locks-pprof-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let prof = dir.join("locks.pb.gz");
    let svg = dir.join("locks.svg");
    let t = start("lock_contention", &[]);
    let pid = t.pid().to_string();
    let run = run_leaktrace(&[
        "attach", "--pid", &pid, "--for", "3s", "--interval", "1s", "--format", "json", "--track", "locks",
        "--pprof", prof.to_str().unwrap(), "--flamegraph", svg.to_str().unwrap(),
    ]);
    assert_eq!(run.status, 0, "stderr: {}", run.stderr);
    let svg_text = std::fs::read_to_string(&svg).unwrap();
    assert!(svg_text.contains("update_hot_counter"), "flame graph lacks the contending function");
    let go = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("go"))
        .find(|p| p.is_file())
        .expect("`go` on PATH (cargo xtask setup installs golang-go)");
    let out = std::process::Command::new(go)
        .args(["tool", "pprof", "-sample_index=delay", "-top", "-cum", prof.to_str().unwrap()])
        .output()
        .unwrap();
    let top = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "pprof failed: {}", String::from_utf8_lossy(&out.stderr));
    assert!(top.contains("update_hot_counter"), "pprof -sample_index=delay -top:\n{top}");
    let _ = std::fs::remove_dir_all(&dir);
}
