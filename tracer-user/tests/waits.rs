//! Waits in progress (`--track waits`, needs root): a pool that drained
//! before leaktrace attached reads as one queue at the borrowing function on
//! the first report, and `check --fail-on-wait` fails on it; an idle worker
//! pool in the same process is reported but never as needing action. Both
//! a C service (pthread condition variables, gcc -O2 without frame
//! pointers: stacks walked by .eh_frame rules in user space) and a Go HTTP
//! service (a channel pool, goroutines from the goroutine scan).

mod common;

use common::*;
use serde_json::Value;

fn waits(report: &Value) -> Vec<&Value> {
    report["findings"].as_array().unwrap().iter().filter(|f| f["kind"] == "wait").collect()
}

fn at<'a>(report: &'a Value, site: &str) -> Option<&'a Value> {
    waits(report).into_iter().find(|f| f["site"] == site)
}

/// For the drained (`leaking`) and the healthy twin of a fixture: the first
/// report's queue at `borrow` and the idle `worker` pool, then `check`.
fn drained_pool_is_a_queue_and_idle_workers_are_not(fixture: &str, borrow: &str, borrower: &str, worker: &str, requests: u64, workers: u64) {
    let drained = start(fixture, &[]);
    let healthy = start(fixture, &["--no-leak"]);
    for (t, leaking) in [(&drained, true), (&healthy, false)] {
        let pid = t.pid().to_string();
        let run = run_leaktrace(&["attach", "--pid", &pid, "--for", "4s", "--interval", "2s", "--format", "json", "--track", "waits"]);
        assert_eq!(run.status, 0, "stderr: {}", run.stderr);
        let first = &run.reports()[0];
        let all = summarize(first);
        // The idle workers: all of them, waiting since before attach, never a queue.
        let idle = at(first, worker).unwrap_or_else(|| panic!("no idle workers at {worker}:{all}"));
        assert_eq!(idle["verdict"], "steady", "{all}");
        assert_eq!(idle["wait_role"], "idle", "{all}");
        assert!(idle["live"].as_u64().unwrap() >= workers - 1, "{idle}");
        let queue = at(first, borrow);
        if leaking {
            let q = queue.unwrap_or_else(|| panic!("no queue at {borrow}:{all}"));
            assert_eq!(q["verdict"], "queued", "{q}");
            assert_eq!(q["live"], requests, "every request waits: {q}");
            assert_eq!(q["waiting_before_attach"], true, "{q}");
            assert!(q["longest_wait_s"].as_f64().unwrap() >= 1.0, "{q}");
            let fns = functions(q);
            assert!(fns.iter().any(|f| f == borrower), "the borrowing path {borrower} not in the stack: {fns:?}");
        } else {
            // A busy, healthy pool: waits come and go, none is a queue.
            assert!(waits(first).iter().all(|f| f["verdict"] != "queued"), "{all}");
        }
        let check = run_leaktrace(&["check", "--pid", &pid, "--for", "3s", "--interval", "1s", "--track", "waits", "--fail-on-wait", "0.5"]);
        if leaking {
            assert_eq!(check.status, 3, "stderr: {}", check.stderr);
            assert!(check.stderr.contains(&format!("QUEUED {requests} waiting at {borrow}")), "{}", check.stderr);
            assert!(!check.stderr.contains(worker), "the idle pool named as a failure: {}", check.stderr);
        } else {
            assert_eq!(check.status, 0, "stderr: {}", check.stderr);
        }
    }
}

#[test]
fn c_condvar_pool_drained_before_attach() {
    drained_pool_is_a_queue_and_idle_workers_are_not("pool_drain", "pool_borrow", "handle_request", "job_queue_pop", 8, 4);
}

#[test]
fn go_channel_pool_drained_before_attach() {
    drained_pool_is_a_queue_and_idle_workers_are_not(
        "pooldrain-go",
        "main.(*dbPool).Acquire",
        "main.queryHandler",
        "main.(*reportPool).worker",
        16,
        4,
    );
}
