//! What already exists at attach: sockets leaked before leaktrace attached
//! are counted on the first report, grouped by peer, with no invented stack
//! (needs root).

mod common;

use common::*;

/// Before-attach connection findings of a report.
fn before_attach(report: &serde_json::Value) -> Vec<&serde_json::Value> {
    report["findings"].as_array().unwrap().iter().filter(|f| f["before_attach"] == true).collect()
}

#[test]
fn sockets_leaked_before_attach_are_counted_on_the_first_report_with_their_peer() {
    // The leak runs for 6 s (one socket per 50 ms) before leaktrace attaches.
    let leaky = start("conn_leak", &[]);
    let quiet = start("conn_leak", &["--no-leak"]);
    std::thread::sleep(std::time::Duration::from_secs(6));
    for (t, leaking) in [(&leaky, true), (&quiet, false)] {
        let pid = t.pid().to_string();
        let run = run_leaktrace(&["attach", "--pid", &pid, "--for", "2s", "--interval", "1s", "--format", "json"]);
        assert_eq!(run.status, 0, "stderr: {}", run.stderr);
        let first = &run.reports()[0];
        let all = summarize(first);
        let groups: Vec<_> = before_attach(first).into_iter().filter(|g| g["kind"] == "connection").collect();
        for g in &groups {
            assert_eq!(g["site"], "[before attach]", "{all}");
            assert!(g["stack"].as_array().unwrap().is_empty(), "a stack was invented:{all}");
        }
        let to_cache: u64 = groups
            .iter()
            .filter(|g| g["peer"].as_str().unwrap().starts_with("127.0.0.1:"))
            .map(|g| g["live"].as_u64().unwrap())
            .sum();
        if leaking {
            assert!(to_cache >= 80, "sockets leaked before attach not counted ({to_cache}):{all}");
        } else {
            // The pool's 4 connections (opened 1.5 s after start), nothing piled up.
            assert!((1..=8).contains(&to_cache), "{to_cache} sockets before attach in the quiet twin:{all}");
        }
        // They stay counted while open, and are never judged a leak.
        let last = run.final_report();
        assert!(before_attach(&last).iter().all(|g| g["verdict"] == "steady"), "{}", summarize(&last));
    }
}

/// Threads already running at attach: watcher threads leaked before attach
/// are one group by name, counted on the first report; the quiet twin has
/// none of them.
#[test]
fn threads_started_before_attach_are_counted_by_name() {
    let leaky = start("thread_leak", &[]);
    let quiet = start("thread_leak", &["--no-leak"]);
    std::thread::sleep(std::time::Duration::from_secs(4));
    for (t, leaking) in [(&leaky, true), (&quiet, false)] {
        let pid = t.pid().to_string();
        let run = run_leaktrace(&[
            "attach", "--pid", &pid, "--for", "1s", "--interval", "1s", "--format", "json", "--track", "threads",
        ]);
        assert_eq!(run.status, 0, "stderr: {}", run.stderr);
        let first = &run.reports()[0];
        let all = summarize(first);
        let watchers: u64 = before_attach(first)
            .iter()
            .filter(|g| g["kind"] == "thread" && g["thread_name"] == "watcher")
            .inspect(|g| assert!(g["stack"].as_array().unwrap().is_empty(), "a stack was invented:{all}"))
            .map(|g| g["live"].as_u64().unwrap())
            .sum();
        if leaking {
            assert!(watchers >= 40, "watcher threads from before attach not counted ({watchers}):{all}");
        } else {
            assert_eq!(watchers, 0, "{all}");
        }
        // The pool's 4 threads, started 1.5 s after start, are there too.
        let pool: u64 = before_attach(first).iter().filter(|g| g["thread_name"] == "pool").map(|g| g["live"].as_u64().unwrap()).sum();
        assert_eq!(pool, 4, "{all}");
    }
}
