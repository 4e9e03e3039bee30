//! Stacks of programs built without frame pointers, unwound from their
//! `.eh_frame` (needs root): a C service built `gcc -O2 -g` on Debian's
//! libhiredis against a real redis-server, and a `cargo build --release`
//! Rust program, `g++ -O2` C++ programs through libstdc++ (threads, and
//! allocations through a container), a contended mutex in `gcc -O2` C, a
//! signal handler's stack through glibc's trampoline. Each planted leak must be the
//! site of its finding with its caller after it, and its busy look-alike
//! must not be a leak.

mod common;

use std::process::Command;

use common::*;
use serde_json::Value;

/// A real redis-server on a free loopback port (stopped on drop) and its port.
fn redis() -> (Server, String) {
    let server = start_redis();
    let port = server.addr.rsplit(':').next().unwrap_or_default().to_string();
    (server, port)
}

/// Runs `fixture_name` with `args` and attaches to it for 8 s with
/// `--track track`: the final report.
fn attach_report(fixture_name: &str, args: &[&str], track: &str) -> Value {
    let t = start(fixture_name, args);
    let pid = t.pid().to_string();
    let run = run_leaktrace(&["attach", "--pid", &pid, "--for", "8s", "--interval", "1s", "--track", track, "--json"]);
    assert_eq!(run.status, 0, "stderr: {}", run.stderr);
    run.final_report()
}

/// Traces `fixture` (given the redis port) for 8 s with `--track track`.
fn trace(fixture_name: &str, track: &str) -> Value {
    let (_redis, port) = redis();
    attach_report(fixture_name, &["--port", &port], track)
}

/// The top finding naming `site` is a leak whose next frame is `caller`,
/// and no finding with `lookalike` in its stack is a leak.
fn assert_planted(report: &Value, kind: &str, site: &str, caller: &str, lookalike: &str) {
    let all = summarize(report);
    let findings = report["findings"].as_array().unwrap();
    let top = findings.iter().find(|f| f["kind"] == kind).unwrap_or_else(|| panic!("no {kind} finding:{all}"));
    assert_eq!(top["site"], site, "wrong site of the top finding:{all}");
    assert_eq!(top["verdict"], "leak", "the planted leak is not judged a leak:{all}");
    let funcs = functions(top);
    let at = funcs.iter().position(|f| f == site).expect("site in stack");
    assert_eq!(funcs.get(at + 1).map(String::as_str), Some(caller), "{site} is not called by {caller}:{all}");
    // The walk went on past the application's frames to the entry point.
    assert!(funcs.iter().any(|f| f == "main" || f.ends_with("::main")), "stack does not reach main:{all}");
    for f in findings_with(report, lookalike) {
        assert_ne!(f["verdict"], "leak", "look-alike {lookalike} judged a leak:{all}");
        assert_ne!(f["site"], site, "look-alike {lookalike} got the planted site:{all}");
    }
}

#[test]
fn c_without_frame_pointers_through_libhiredis() {
    let report = trace("nofp_service", "connections");
    assert_planted(&report, "connection", "get_user_profile", "handle_profile", "get_session");
    // The frames inside libhiredis (no frame pointers either) are there.
    let top = &report["findings"][0];
    assert!(functions(top).iter().any(|f| f == "redisConnect"), "{}", summarize(&report));
}

#[test]
fn rust_release_build_names_the_application_function() {
    let report = trace("conn_leak_rs", "connections");
    assert_planted(&report, "connection", "conn_leak_rs::dial", "conn_leak_rs::handle_request", "conn_leak_rs::check_health");
    // std's frames are in the stack but are not the site.
    let funcs = functions(&report["findings"][0]);
    assert!(funcs.iter().any(|f| f.contains("TcpStream") && f.contains("connect")), "{funcs:?}");
}

#[test]
fn c_without_frame_pointers_threads() {
    let report = trace("nofp_service", "threads");
    assert_planted(&report, "thread", "start_watcher", "serve", "run_job");
}

#[test]
fn c_without_frame_pointers_allocations() {
    let report = trace("nofp_service", "allocations");
    let all = summarize(&report);
    let planted = findings_with(&report, "remember_user");
    let top = planted.iter().find(|f| f["site"] == "remember_user").unwrap_or_else(|| panic!("no remember_user site:{all}"));
    let funcs = functions(top);
    assert_eq!(funcs.get(1).map(String::as_str), Some("serve"), "{all}");
    assert!(funcs.iter().any(|f| f == "main"), "{all}");
    assert!(top["live"].as_u64().unwrap() >= 50, "{all}");
    assert_eq!(top["verdict"], "leak", "the planted allocations are not judged a leak:{all}");
    for f in findings_with(&report, "format_reply") {
        assert_ne!(f["verdict"], "leak", "look-alike format_reply judged a leak:{all}");
    }
}

/// C++ built `g++ -O2 -g` making threads with libstdc++'s `std::thread`
/// from handlers called through `std::function`: the planted function is
/// the site (not libstdc++'s or an inlined `std::` template frame), the
/// walk goes on through the `std::function` invoker to main, and the
/// joined look-alike is no leak.
#[test]
fn cpp_without_frame_pointers_threads() {
    let report = attach_report("nofp_threads", &[], "threads");
    let all = summarize(&report);
    let top = report["findings"].as_array().unwrap().iter().find(|f| f["kind"] == "thread").unwrap_or_else(|| panic!("no thread finding:{all}"));
    assert_eq!(top["site"], "start_watcher", "wrong site:{all}");
    assert_eq!(top["verdict"], "leak", "{all}");
    let funcs = functions(top);
    let pos = |name: &str| funcs.iter().position(|f| f == name).unwrap_or_else(|| panic!("{name} missing:{all}"));
    let in_libstdcxx = funcs.iter().position(|f| f.contains("_M_start_thread")).unwrap_or_else(|| panic!("libstdc++ frame missing:{all}"));
    let invoker = funcs.iter().position(|f| f.starts_with("std::function")).unwrap_or_else(|| panic!("std::function invoker missing:{all}"));
    assert!(in_libstdcxx < pos("start_watcher"), "{all}");
    assert!(pos("start_watcher") < invoker && invoker < pos("serve") && pos("serve") < pos("main"), "{all}");
    for f in findings_with(&report, "run_job") {
        assert_ne!(f["verdict"], "leak", "look-alike run_job judged a leak:{all}");
        assert_ne!(f["site"], "start_watcher", "{all}");
    }
}

/// A no-FP C program opening sockets in a SIGALRM handler: the stack goes
/// through glibc's signal trampoline (`__restore_rt`, named) to the
/// function the signal interrupted, and on to main. The look-alike that
/// opens and closes a socket in the main loop is no leak.
#[test]
fn signal_handler_stack_goes_through_the_signal_frame() {
    let report = attach_report("nofp_signal", &[], "connections");
    let all = summarize(&report);
    // Alarms mostly land in `crunch`; the one finding there is the top one.
    let top = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["site"] == "on_alarm")
        .max_by_key(|f| f["live"].as_u64().unwrap_or(0))
        .unwrap_or_else(|| panic!("no on_alarm finding:{all}"));
    assert_eq!(top["verdict"], "leak", "{all}");
    let funcs = functions(top);
    let pos = |name: &str| funcs.iter().position(|f| f == name).unwrap_or_else(|| panic!("{name} missing:{all}"));
    assert!(pos("on_alarm") < pos("__restore_rt"), "{all}");
    assert_eq!(funcs.get(pos("__restore_rt") + 1).map(String::as_str), Some("crunch"), "the interrupted function follows the signal frame:{all}");
    assert!(pos("crunch") < pos("serve") && pos("serve") < pos("main"), "{all}");
    for f in findings_with(&report, "check_peer") {
        assert_ne!(f["verdict"], "leak", "look-alike check_peer judged a leak:{all}");
    }
}

/// `leaktrace check -- <fixture>` on an unstripped no-FP program: exit 3,
/// and the LEAK line names the planted function, never the look-alike.
fn check_names_planted(fixture_name: &str, site: &str, caller: &str, lookalike: &str) {
    let (_redis, port) = redis();
    let bin = fixture(fixture_name);
    let run = run_leaktrace(&[
        "check", "--for", "12s", "--interval", "1s", "--track", "connections", "--",
        bin.to_str().unwrap(), "--port", &port,
    ]);
    assert_eq!(run.status, 3, "the planted leak must fail check; stderr: {}", run.stderr);
    let leaks: Vec<&str> = run.stderr.lines().filter(|l| l.trim_start().starts_with("LEAK ")).collect();
    assert!(
        leaks.iter().any(|l| {
            let at = format!("LEAK connection at {site}");
            l.contains(&format!("{at}:")) || l.contains(&format!("{at} via "))
        }),
        "no LEAK line names {site}; stderr: {}",
        run.stderr
    );
    assert!(
        run.stderr.contains(&format!("created by {site} <- {caller}")),
        "{site} is not shown called by {caller}; stderr: {}",
        run.stderr
    );
    assert!(
        !run.stderr.lines().any(|l| l.contains(lookalike)),
        "the look-alike {lookalike} is named; stderr: {}",
        run.stderr
    );
}

#[test]
fn check_fails_naming_the_planted_c_function() {
    check_names_planted("nofp_service", "get_user_profile", "handle_profile", "get_session");
}

#[test]
fn check_fails_naming_the_planted_rust_function() {
    check_names_planted("conn_leak_rs", "conn_leak_rs::dial", "conn_leak_rs::handle_request", "conn_leak_rs::check_health");
}

#[test]
fn stripped_program_without_frame_pointers_still_unwinds() {
    let dir = std::env::temp_dir().join(format!("leaktrace-nofp-stripped-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bin = dir.join("nofp_stripped");
    std::fs::copy(fixture("nofp_service"), &bin).unwrap();
    let st = Command::new("strip").arg("--strip-all").arg(&bin).status().expect("strip (binutils)");
    assert!(st.success());
    let (_redis, port) = redis();
    let run = run_leaktrace(&[
        "check", "--for", "6s", "--interval", "1s", "--track", "connections", "--json", "--",
        bin.to_str().unwrap(), "--port", &port,
    ]);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(run.status, 3, "the stripped leak must still fail check; stderr: {}", run.stderr);
    assert_eq!(run.stderr.matches("has no symbols (stripped?)").count(), 1, "warned once: {}", run.stderr);
    let report = run.final_report();
    let leak = report["findings"].as_array().unwrap().iter().find(|f| f["verdict"] == "leak").unwrap();
    assert!(leak["site"].as_str().unwrap().starts_with("nofp_stripped+0x"), "{}", summarize(&report));
    // Through libhiredis, then several frames of the stripped program (its
    // .eh_frame survived strip).
    let funcs = functions(leak);
    let after = funcs.iter().position(|f| f == "redisConnect").expect("redisConnect in the stack");
    let app_frames = leak["stack"].as_array().unwrap()[after + 1..]
        .iter()
        .take_while(|f| f["module"].as_str().is_some_and(|m| m.ends_with("nofp_stripped")))
        .count();
    assert!(app_frames >= 3, "stripped program's frames not unwound: {}", summarize(&report));
}

/// A frame-pointer program whose callback runs under glibc's `qsort` (no
/// frame pointers): the stack comes out whole on both sides of libc. A
/// recursion deeper than the walk's bound is cut at 32 frames, counted,
/// and what is kept is right.
#[test]
fn mixed_and_deep_stacks() {
    let report = attach_report("mixed_stacks", &[], "connections");
    let all = summarize(&report);

    let audit = findings_with(&report, "open_audit_socket");
    assert_eq!(audit.len(), 1, "{all}");
    assert_eq!(audit[0]["verdict"], "leak", "{all}");
    assert_eq!(audit[0]["site"], "dial", "{all}");
    let funcs = functions(audit[0]);
    let pos = |name: &str| funcs.iter().position(|f| f == name).unwrap_or_else(|| panic!("{name} missing:{all}"));
    let in_libc = funcs.iter().position(|f| f.contains("msort") || f.contains("qsort")).expect("qsort's frames");
    assert!(pos("open_audit_socket") < pos("by_priority"), "{all}");
    assert!(pos("by_priority") < in_libc && in_libc < pos("sort_requests"), "callback not unwound through libc:{all}");
    assert!(pos("sort_requests") < pos("main"), "{all}");
    for f in findings_with(&report, "probe_socket") {
        assert_ne!(f["verdict"], "leak", "look-alike probe_socket judged a leak:{all}");
    }

    let deep = findings_with(&report, "leaf_socket");
    assert_eq!(deep.len(), 1, "one finding for the deep path:{all}");
    let funcs = functions(deep[0]);
    assert_eq!(deep[0]["verdict"], "leak", "{all}");
    assert!(funcs.len() >= 32, "cut at 32 frames, not before:{all}");
    assert!(
        funcs.iter().all(|f| ["__GI_socket", "socket", "dial", "leaf_socket", "descend"].contains(&f.as_str())),
        "a cut stack holds only the frames that are there: {funcs:?}"
    );
    assert!(report["lost"]["truncated_stacks"].as_u64().unwrap_or(0) > 0, "the cut is counted:{all}");
}

/// A contended pthread mutex in C built `gcc -O2 -g` (no frame-pointer
/// flags), locked through Debian's glibc: the waiters' stacks name the
/// planted function and its caller, and the same-shaped function on a lock
/// only one thread takes is not contended.
#[test]
fn c_without_frame_pointers_locks() {
    let report = attach_report("nofp_locks", &[], "locks");
    let all = summarize(&report);
    let locks: Vec<&Value> = report["findings"].as_array().unwrap().iter().filter(|f| f["kind"] == "lock").collect();
    let hot = locks.first().unwrap_or_else(|| panic!("no lock finding:{all}"));
    assert_eq!(hot["lock"], "hot_lock", "the contended lock is not the top finding:{all}");
    assert_eq!(hot["verdict"], "contended", "{all}");
    assert_eq!(hot["site"], "update_hot_counter", "{all}");
    let funcs = functions(hot);
    let at = funcs.iter().position(|f| f == "update_hot_counter").unwrap_or_else(|| panic!("waiter stack:{all}"));
    assert_eq!(funcs.get(at + 1).map(String::as_str), Some("hot_worker"), "{all}");
    for f in &locks {
        if f["lock"] == "quiet_lock" || functions(f).iter().any(|n| n == "update_quiet_counter") {
            assert_ne!(f["verdict"], "contended", "look-alike update_quiet_counter judged contended:{all}");
        }
    }
}

/// C++ built `g++ -O2 -g` allocating through libstdc++'s containers: a
/// `std::unordered_map` that is never evicted (nodes from `operator new`
/// inlined into the program, string buffers from inside libstdc++, which has
/// no frame pointers) is a leak at the program's function, not at a `std::`
/// frame; a `std::vector` of strings built and dropped per request is not.
#[test]
fn cpp_without_frame_pointers_allocations_through_a_container() {
    let report = attach_report("nofp_alloc", &[], "allocations");
    let all = summarize(&report);
    let planted: Vec<&Value> =
        report["findings"].as_array().unwrap().iter().filter(|f| f["kind"] == "allocation" && f["site"] == "cache_session(int)").collect();
    assert!(planted.iter().any(|f| f["verdict"] == "leak"), "no cache_session leak:{all}");
    // Whole, or (a few small findings, intermittently under load) cut short
    // at the site; never a wrong caller. The leak itself whole.
    for f in &planted {
        let funcs = functions(f);
        let at = funcs.iter().position(|n| n == "cache_session(int)").expect("site in stack");
        match funcs.get(at + 1).map(String::as_str) {
            Some("serve(bool)") => assert!(funcs.iter().any(|n| n == "main"), "stack does not reach main:{all}"),
            None => {}
            Some(other) => panic!("cache_session(int) called by {other}:{all}"),
        }
    }
    let leak = planted.iter().filter(|f| f["verdict"] == "leak").max_by_key(|f| f["live"].as_u64()).unwrap();
    assert!(functions(leak).iter().any(|n| n == "main"), "the leak's stack does not reach main:{all}");
    // The string buffers are allocated inside libstdc++: walked through it.
    assert!(
        planted.iter().any(|f| functions(f).iter().any(|n| n.contains("_M_construct"))),
        "no stack through libstdc++'s string constructor:{all}"
    );
    for f in findings_with(&report, "build_reply(int)") {
        assert_ne!(f["verdict"], "leak", "look-alike build_reply judged a leak:{all}");
        assert_ne!(f["site"], "cache_session(int)", "{all}");
    }
}

/// The same C service built with its unwind information in `.debug_frame`
/// only, moved to a separate debug file as packages ship it
/// (`.debug/nofp_service_debuglink.debug`, found by its `.gnu_debuglink`):
/// the binary's own CFI covers none of its functions, so the planted site
/// and its callers come out only through the debug file.
#[test]
fn unwind_info_from_a_separate_debug_file() {
    let report = trace("nofp_service_debuglink", "connections");
    assert_planted(&report, "connection", "get_user_profile", "handle_profile", "get_session");
}

/// A service that loads a plugin per request and unloads it (`dlopen`,
/// `dlclose`): two builds of one plugin with the same code offsets and
/// different stack frames, mapped in turn at the same address. Every stack
/// through the plugin must come out whole — a rule kept from the unloaded
/// one would walk the other's frames wrong — the kept socket is the leak and
/// the closed one not, and the rules of unmapped code are dropped (the rule
/// table stays small however many times the plugins are loaded).
#[test]
fn rules_of_unloaded_libraries_are_dropped() {
    let t = start("dlopen_plugins", &[]);
    let pid = t.pid().to_string();
    let run = run_leaktrace(&["attach", "--pid", &pid, "--for", "8s", "--interval", "1s", "--track", "connections", "--json"]);
    drop(t);
    assert_eq!(run.status, 0, "stderr: {}", run.stderr);
    let report = run.final_report();
    let all = summarize(&report);
    let through = findings_with(&report, "plugin_dial");
    assert!(!through.is_empty(), "no stack through the plugin:{all}");
    // Whole, or cut short (a call path whose plugin was unloaded before its
    // first walk was finished: counted), never wrong.
    let mut cut = 0;
    for f in &through {
        let funcs = functions(f);
        let at = funcs.iter().position(|n| n == "plugin_dial").unwrap();
        let rest: Vec<&str> = funcs[at + 1..].iter().map(String::as_str).collect();
        match rest.as_slice() {
            [] => cut += 1,
            ["keep_audit_socket" | "probe_health", "serve", "main", ..] => {}
            _ => panic!("wrong frames after plugin_dial: {rest:?}:{all}"),
        }
    }
    assert!(cut == 0 || report["lost"]["truncated_stacks"].as_u64().unwrap_or(0) > 0, "cut stacks not counted:{all}");
    let leak = through.iter().find(|f| f["site"] == "keep_audit_socket").unwrap_or_else(|| panic!("no keep_audit_socket finding:{all}"));
    assert_eq!(leak["verdict"], "leak", "{all}");
    for f in findings_with(&report, "probe_health") {
        assert_ne!(f["verdict"], "leak", "look-alike probe_health judged a leak:{all}");
    }
    // "unwinding: N rules learned (...) ...; M rules dropped with their unmapped code"
    let note = run.stderr.lines().find(|l| l.contains("unwinding: ")).unwrap_or_else(|| panic!("no unwinding note: {}", run.stderr));
    let number_before = |word: &str| -> u64 {
        let head = &note[..note.find(word).unwrap_or_else(|| panic!("{word} not in {note}"))];
        head.split_whitespace().last().and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("no count before {word}: {note}"))
    };
    assert!(number_before("rules dropped") > 0, "{note}");
    assert!(number_before("rules learned") < 200, "rule table grows with every load: {note}");
}
