//! The connection tracker end to end: the real `leaktrace` against real
//! programs with a planted leak and busy look-alikes (needs root).

mod common;

use common::*;

/// Asserts the planted leak is found with its stack, and no look-alike is a leak.
fn assert_leak_and_lookalikes(report: &serde_json::Value, site: &str, leaker: &str, lookalikes: &[&str]) {
    let all = summarize(report);
    let leaks: Vec<_> = findings_with(report, leaker);
    assert!(!leaks.is_empty(), "no finding has {leaker} in its stack:{all}");
    let leak = leaks[0];
    assert_eq!(leak["verdict"], "leak", "the planted leak is not judged a leak:{all}");
    assert_eq!(leak["kind"], "connection");
    assert_eq!(leak["site"], site, "wrong site:{all}");
    // The direct caller of the socket call is in the stack, right before its caller.
    let funcs = functions(leak);
    let at = funcs.iter().position(|f| f == site).expect("site in stack");
    assert_eq!(funcs.get(at + 1).map(String::as_str), Some(leaker), "{site} is not called by {leaker}:{all}");
    assert!(leak["live"].as_u64().unwrap() >= 20, "too few live connections:{all}");
    assert!(leak["growth_per_min"].as_f64().unwrap() > 300.0, "growth too small:{all}");
    assert!(leak["peer"].as_str().unwrap_or("").starts_with("127.0.0.1:"), "peer missing:{all}");
    for look in lookalikes {
        for f in findings_with(report, look) {
            assert_ne!(f["verdict"], "leak", "look-alike {look} judged a leak:{all}");
        }
    }
    let leaks_total = report["findings"].as_array().unwrap().iter().filter(|f| f["verdict"] == "leak").count();
    assert_eq!(leaks_total, 1, "exactly one leak expected:{all}");
}

#[test]
fn c_leak_is_found_by_attach_and_lookalikes_are_not() {
    let t = start("conn_leak", &[]);
    let pid = t.pid().to_string();
    let run = run_leaktrace(&["attach", "--pid", &pid, "--for", "8s", "--interval", "1s", "--format", "json"]);
    assert_eq!(run.status, 0, "stderr: {}", run.stderr);
    let report = run.final_report();
    assert_eq!(report["pid"].as_u64().unwrap().to_string(), pid);
    assert_eq!(report["comm"], "conn_leak");
    assert_leak_and_lookalikes(&report, "dial_cache", "bad_handler", &["good_handler", "pool_init", "pool_handler"]);
    // The pool opened after attach is seen, and judged steady.
    let pool = findings_with(&report, "pool_init");
    assert!(!pool.is_empty(), "pool not seen:{}", summarize(&report));
    assert_eq!(pool[0]["verdict"], "steady");
    assert_eq!(pool[0]["live"], 4);
    // Churn was seen (created and ended) even if nothing of it is live.
    let lost = &report["lost"];
    assert_eq!(lost["events"], 0);
    assert_eq!(lost["stacks"], 0);
    assert!(report["events"]["connection"].as_u64().unwrap() > 500, "churn events not seen");
    // One report per interval, then the final one.
    assert!(run.reports().len() >= 8, "expected a report per interval");
}

#[test]
fn go_leak_is_found_by_attach_and_lookalikes_are_not() {
    go_leak_found("connleak-go");
}

/// The same fixture built with Go 1.25 (DWARF 5, a newer runtime layout).
#[test]
fn go125_leak_is_found_by_attach_and_lookalikes_are_not() {
    go_leak_found("connleak-go125");
}

fn go_leak_found(fixture_name: &str) {
    let t = start(fixture_name, &[]);
    let pid = t.pid().to_string();
    let run = run_leaktrace(&["attach", "--pid", &pid, "--for", "8s", "--interval", "1s", "--format", "json"]);
    assert_eq!(run.status, 0, "stderr: {}", run.stderr);
    let report = run.final_report();
    assert_leak_and_lookalikes(&report, "main.dialCache", "main.badHandler", &["main.goodHandler", "main.poolInit"]);
    let leak = findings_with(&report, "main.badHandler")[0];
    let funcs = functions(leak);
    assert!(funcs.iter().any(|f| f == "net.Dial"), "Go stack misses net.Dial: {funcs:?}");
    // file:line resolved from DWARF.
    let frame = leak["stack"].as_array().unwrap().iter().find(|f| f["function"] == "main.badHandler").unwrap();
    assert!(frame["file"].as_str().unwrap_or("").ends_with("main.go"), "no file for main.badHandler: {frame}");
    assert!(frame["line"].as_u64().is_some());
    let pool = findings_with(&report, "main.poolInit");
    assert!(!pool.is_empty(), "pool not seen:{}", summarize(&report));
    assert_eq!(pool[0]["verdict"], "steady");
}

#[test]
fn run_traces_from_the_first_instruction() {
    let bin = fixture("connleak-go");
    let run = run_leaktrace(&[
        "run", "--for", "6s", "--interval", "1s", "--format", "json", "--", bin.to_str().unwrap(), "-pool-delay-ms", "0",
    ]);
    assert_eq!(run.status, 0, "stderr: {}", run.stderr);
    let report = run.final_report();
    assert_leak_and_lookalikes(&report, "main.dialCache", "main.badHandler", &["main.goodHandler", "main.poolInit"]);
    // With no delay the pool is opened at start-up: only `run` sees it.
    let pool = findings_with(&report, "main.poolInit");
    assert!(!pool.is_empty(), "run missed the start-up pool:{}", summarize(&report));
}

#[test]
fn check_exit_status_says_whether_something_leaks() {
    let bin = fixture("conn_leak");
    let leaky = run_leaktrace(&["check", "--for", "6s", "--interval", "1s", "--", bin.to_str().unwrap()]);
    assert_eq!(leaky.status, 3, "leaking program must fail check; stderr: {}", leaky.stderr);
    assert!(leaky.stderr.contains("LEAK connection at dial_cache"), "failing finding not listed: {}", leaky.stderr);
    assert!(leaky.stderr.contains("created by dial_cache <- bad_handler <- request_loop"), "{}", leaky.stderr);
    assert!(leaky.stderr.contains("leaktrace check: FAIL: 1 leak"), "{}", leaky.stderr);
    assert!(leaky.stderr.contains("exit 3 (0 = no leak, 3 = leak found, 1 = error)"), "{}", leaky.stderr);
    assert!(leaky.stdout.contains("final report"), "no final table: {}", leaky.stdout);

    let clean = run_leaktrace(&["check", "--for", "6s", "--interval", "1s", "--", bin.to_str().unwrap(), "--no-leak"]);
    assert_eq!(clean.status, 0, "clean program must pass check; stdout: {}\nstderr: {}", clean.stdout, clean.stderr);
    assert!(clean.stderr.contains("leaktrace check: PASS: 0 leaks"), "{}", clean.stderr);

    // And by pid.
    let t = start("connleak-go", &["-no-leak"]);
    let pid = t.pid().to_string();
    let by_pid = run_leaktrace(&["check", "--pid", &pid, "--for", "6s", "--interval", "1s", "--json"]);
    assert_eq!(by_pid.status, 0, "stdout: {}\nstderr: {}", by_pid.stdout, by_pid.stderr);
    let report = by_pid.final_report();
    assert!(report["findings"].as_array().unwrap().iter().all(|f| f["verdict"] != "leak"), "{}", summarize(&report));
}

#[test]
fn target_exiting_mid_trace_still_gets_a_final_report() {
    let t = start("conn_leak", &["--exit-after-ms", "4000"]);
    let pid = t.pid().to_string();
    let run = run_leaktrace(&["attach", "--pid", &pid, "--interval", "1s", "--format", "json"]);
    assert_eq!(run.status, 0, "attach must exit 0 when the target exits; stderr: {}", run.stderr);
    let report = run.final_report();
    assert_eq!(report["exited"], true, "final report must say the target exited");
    // The state at exit, not zero: the leak was live when the target ended.
    let leak = findings_with(&report, "bad_handler");
    assert!(!leak.is_empty() && leak[0]["live"].as_u64().unwrap() >= 20, "{}", summarize(&report));
    assert!(run.stderr.contains("detached"), "{}", run.stderr);
}

#[test]
fn prometheus_endpoint_serves_growth_of_the_leaking_site() {
    let t = start("conn_leak", &[]);
    let pid = t.pid().to_string();
    let mut child = std::process::Command::new(leaktrace())
        .args(["attach", "--pid", &pid, "--for", "6s", "--interval", "1s", "--listen", "127.0.0.1:0", "--format", "json"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stderr));
    let addr = loop {
        let line = lines.next().expect("leaktrace ended before serving").unwrap();
        if let Some(rest) = line.split("serving metrics at http://").nth(1) {
            break rest.trim_end_matches("/metrics").to_string();
        }
    };
    std::thread::sleep(std::time::Duration::from_secs(5));
    let body = http_get(&addr, "/metrics");
    let _ = child.wait();
    for family in [
        "# TYPE leaktrace_live_objects gauge",
        "# TYPE leaktrace_growth_per_minute gauge",
        "# TYPE leaktrace_events counter",
        "# TYPE leaktrace_events_lost counter",
    ] {
        assert!(body.contains(family), "missing {family} in:\n{body}");
    }
    let line = body
        .lines()
        .find(|l| l.starts_with("leaktrace_growth_per_minute{") && l.contains("site=\"dial_cache\""))
        .unwrap_or_else(|| panic!("no growth series for dial_cache:\n{body}"));
    let value: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(value > 300.0, "growth of the leak too small: {line}");
    assert!(line.contains("verdict=\"leak\""), "{line}");
}

fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn a_full_socket_table_is_counted_not_hidden() {
    let t = start("conn_leak", &[]);
    let pid = t.pid().to_string();
    let run = run_leaktrace(&[
        "attach", "--pid", &pid, "--for", "4s", "--interval", "1s", "--format", "json", "--max-sockets", "16",
    ]);
    assert_eq!(run.status, 0, "stderr: {}", run.stderr);
    let report = run.final_report();
    let lost = report["lost"]["events"].as_u64().unwrap();
    assert!(lost > 20, "a 16-entry table must lose events: {}", report["lost"]);
    // What is tracked stays right: never more live than the table holds.
    // (Sockets open before attach are not in the table: an inventory of
    // its own, bounded by --max-sockets too.)
    let (before, tracked): (Vec<_>, Vec<_>) =
        report["findings"].as_array().unwrap().iter().partition(|f| f["before_attach"] == true);
    let live: u64 = tracked.iter().map(|f| f["live"].as_u64().unwrap()).sum();
    assert!(live <= 16, "more live sockets than the table holds:{}", summarize(&report));
    let before_live: u64 = before.iter().map(|f| f["live"].as_u64().unwrap()).sum();
    assert!(before_live <= 16, "more sockets from before attach than --max-sockets:{}", summarize(&report));
}

#[test]
fn stripped_binary_still_gets_sites() {
    let dir = std::env::temp_dir().join(format!("leaktrace-stripped-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bin = dir.join("conn_leak_stripped");
    std::fs::copy(fixture("conn_leak"), &bin).unwrap();
    let st = std::process::Command::new("strip").arg("--strip-all").arg(&bin).status().expect("strip (binutils)");
    assert!(st.success());
    let run = run_leaktrace(&["check", "--for", "5s", "--interval", "1s", "--json", "--", bin.to_str().unwrap()]);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(run.status, 3, "the stripped leak must still fail check; stderr: {}", run.stderr);
    assert!(run.stderr.contains("has no symbols (stripped?)"), "no warning: {}", run.stderr);
    let report = run.final_report();
    let leak = report["findings"].as_array().unwrap().iter().find(|f| f["verdict"] == "leak").unwrap();
    let site = leak["site"].as_str().unwrap();
    assert!(site.starts_with("conn_leak_stripped+0x"), "site of a stripped frame: {site}");
    let first = &leak["stack"][1];
    assert_eq!(first["function"], "[unknown]");
    assert!(first["addr"].as_str().unwrap().starts_with("0x"));
}
