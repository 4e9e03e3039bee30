//! Faults found by probing leaktrace as a hostile or careless user would
//! (issue "Reliability", its findings): each test here would have caught one.
//! docs/reliability.md lists what is tested and where.

mod common;

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::*;

fn error_line(run: &Run) -> String {
    let lines: Vec<&str> = run.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected exactly one line on stderr, got:\n{}", run.stderr);
    lines[0].to_string()
}

/// `--max-findings 0` cuts every finding from the report, not from the
/// verdict: a leaking program still fails, a clean one still passes.
#[test]
fn check_judges_findings_cut_from_the_display() {
    let bin = fixture("conn_leak");
    let bin = bin.to_str().unwrap();
    let leaky = run_leaktrace(&["check", "--for", "6s", "--interval", "1s", "--max-findings", "0", "--", bin]);
    assert_eq!(leaky.status, 3, "a leak cut from the display passed check; stderr: {}", leaky.stderr);
    assert!(leaky.stderr.contains("LEAK connection at dial_cache"), "{}", leaky.stderr);
    let clean = run_leaktrace(&["check", "--for", "6s", "--interval", "1s", "--max-findings", "0", "--", bin, "--no-leak"]);
    assert_eq!(clean.status, 0, "stderr: {}", clean.stderr);
    assert!(clean.stderr.contains("PASS"), "{}", clean.stderr);
}

/// A command that fails on its own is an error (exit 1, its status named),
/// not a pass; one that exits 0 by itself is judged as usual.
#[test]
fn check_of_a_failing_command_is_an_error() {
    let run = run_leaktrace(&["check", "--for", "10s", "--", "/bin/false"]);
    assert_eq!(run.status, 1, "stderr: {}", run.stderr);
    assert!(run.stderr.contains("leaktrace: error: the command exited with status 1"), "{}", run.stderr);
    assert!(!run.stderr.contains("PASS"), "{}", run.stderr);
    let run = run_leaktrace(&["check", "--for", "10s", "--", "/bin/true"]);
    assert_eq!(run.status, 0, "stderr: {}", run.stderr);
    assert!(run.stderr.contains("PASS"), "{}", run.stderr);
    let run = run_leaktrace(&["check", "--for", "10s", "--", "sh", "-c", "kill -SEGV $$"]);
    assert_eq!(run.status, 1, "stderr: {}", run.stderr);
    assert!(run.stderr.contains("the command was killed by signal 11"), "{}", run.stderr);
}

/// A 32-bit program (conn_leak built with -m32) is refused with one line,
/// by pid and as a command; the 64-bit build of the same source is traced.
#[test]
fn a_32_bit_target_is_refused() {
    let t = start("conn_leak32", &[]);
    let pid = t.pid().to_string();
    let run = run_leaktrace(&["check", "--pid", &pid, "--for", "2s"]);
    assert_eq!(run.status, 1, "stderr: {}", run.stderr);
    let line = error_line(&run);
    assert!(line.contains("is a 32-bit program: leaktrace traces 64-bit x86-64 processes only"), "{line}");
    let run = run_leaktrace(&["check", "--for", "2s", "--", fixture("conn_leak32").to_str().unwrap()]);
    assert_eq!(run.status, 1, "stderr: {}", run.stderr);
    assert!(error_line(&run).contains("is a 32-bit program"), "{}", run.stderr);
    let t64 = start("conn_leak", &["--no-leak"]);
    let run = run_leaktrace(&["check", "--pid", &t64.pid().to_string(), "--for", "2s", "--interval", "1s"]);
    assert_eq!(run.status, 0, "stderr: {}", run.stderr);
}

/// `check ... 2>&1 | head -n 1`: both pipes closed after one line. No
/// panic (101): check traces to the end and exits with its verdict.
#[test]
fn check_with_closed_pipes_exits_with_its_verdict() {
    let t = start("conn_leak", &[]);
    let (reader, writer) = std::io::pipe().unwrap();
    let mut child = Command::new(leaktrace())
        .args(["check", "--pid", &t.pid().to_string(), "--for", "6s", "--interval", "1s"])
        .stdout(writer.try_clone().unwrap())
        .stderr(writer)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(reader).read_line(&mut first).unwrap(); // the reader is dropped here: `head -n 1`
    assert!(first.contains("leaktrace"), "{first}");
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(3), "check with closed stdout/stderr: {status:?}");
}

/// `attach ... | head -n 2`: the trace ends once a report cannot be
/// written (not at --for), detaches, exit 0.
#[test]
fn attach_stops_when_stdout_is_closed() {
    let t = start("conn_leak", &[]);
    let started = Instant::now();
    let mut child = Command::new(leaktrace())
        .args(["attach", "--pid", &t.pid().to_string(), "--for", "60s", "--interval", "1s"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = read_all(child.stderr.take().unwrap());
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    for _ in 0..2 {
        lines.next().unwrap().unwrap();
    }
    drop(lines);
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("leaktrace kept tracing after its stdout was closed");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let stderr = err.join().unwrap();
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("stdout was closed: ending the trace"), "{stderr}");
    assert!(stderr.contains("detached from"), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(30));
    // The target was not harmed.
    assert!(std::path::Path::new(&format!("/proc/{}", t.pid())).exists());
}

/// A free loopback port (bound, then released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// With a descriptor limit of 256 that leaktrace cannot raise, 400 idle
/// clients on /metrics neither exhaust its descriptors nor make it take the
/// target for dead: the leak is still found, no `exited`; idle clients are
/// closed after the idle timeout and a new scrape is served.
#[test]
fn idle_metrics_clients_do_not_end_the_trace() {
    use std::io::{Read, Write};
    let t = start("conn_leak", &[]);
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut child = Command::new("prlimit")
        .args(["--nofile=256:256", "--"])
        .arg(leaktrace())
        .args(["attach", "--pid", &t.pid().to_string(), "--for", "16s", "--interval", "1s", "--json", "--listen", &addr])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("prlimit (util-linux) is needed for this test");
    let out = read_all(child.stdout.take().unwrap());
    let mut err_lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut stderr = String::new();
    for line in err_lines.by_ref() {
        let line = line.unwrap();
        stderr += &line;
        stderr += "\n";
        if line.contains("serving metrics") {
            break;
        }
    }
    let err = std::thread::spawn(move || err_lines.map_while(Result::ok).collect::<Vec<_>>().join("\n"));
    let opened = Instant::now();
    let mut idle: Vec<std::net::TcpStream> = (0..400).filter_map(|_| std::net::TcpStream::connect(&addr).ok()).collect();
    assert!(idle.len() >= 300, "only {} connections", idle.len());
    // Idle clients are closed by the server (EOF) once the idle timeout passed.
    std::thread::sleep(Duration::from_secs(11).saturating_sub(opened.elapsed()));
    let mut first = idle.remove(0);
    first.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 16];
    assert!(matches!(first.read(&mut buf), Ok(0)), "an idle client was not closed");
    drop(idle);
    std::thread::sleep(Duration::from_millis(500));
    let mut scrape = std::net::TcpStream::connect(&addr).unwrap();
    scrape.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    scrape.write_all(format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes()).unwrap();
    let mut body = String::new();
    let _ = scrape.read_to_string(&mut body);
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    assert!(body.contains("leaktrace_up 1"), "{body}");
    let status = child.wait().unwrap();
    let stderr = stderr + &err.join().unwrap();
    let run = Run { status: status.code().unwrap_or(-1), stdout: out.join().unwrap(), stderr };
    assert_eq!(run.status, 0, "{}", run.stderr);
    let report = run.final_report();
    assert!(report.get("exited").is_none(), "the target was taken for dead: {}", run.stderr);
    assert!(report["elapsed_s"].as_f64().unwrap() >= 15.0, "the trace ended early: {}", run.stderr);
    let leaks = findings_with(&report, "dial_cache");
    assert!(leaks.iter().any(|f| f["verdict"] == "leak" && functions(f).iter().any(|n| n == "bad_handler")), "{}", summarize(&report));
}

/// `--for 300000000000y` panicked after attaching, `--interval 1ms` spent a
/// core: both are refused by the command line (exit 2, one line each).
#[test]
fn absurd_durations_are_refused_before_attaching() {
    let t = start("conn_leak", &["--no-leak"]);
    let pid = t.pid().to_string();
    let run = run_leaktrace(&["attach", "--pid", &pid, "--for", "300000000000y"]);
    assert_eq!(run.status, 2, "{}", run.stderr);
    assert!(run.stderr.contains("must be at most 365d"), "{}", run.stderr);
    assert!(!run.stderr.contains("attached"), "{}", run.stderr);
    let run = run_leaktrace(&["attach", "--pid", &pid, "--interval", "1ms"]);
    assert_eq!(run.status, 2, "{}", run.stderr);
    assert!(run.stderr.contains("must be at least 250ms"), "{}", run.stderr);
}

/// `run --listen <busy port>` fails before the command starts; a host name
/// (`localhost:PORT`) is accepted and served.
#[test]
fn listen_is_bound_before_the_command_starts() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let marker = std::env::temp_dir().join(format!("leaktrace-busy-port-{}", std::process::id()));
    let _ = std::fs::remove_file(&marker);
    let run = run_leaktrace(&["run", "--for", "3s", "--listen", &addr, "--", "touch", marker.to_str().unwrap()]);
    assert_eq!(run.status, 1, "{}", run.stderr);
    assert!(error_line(&run).starts_with(&format!("leaktrace: error: cannot listen on {addr}: ")), "{}", run.stderr);
    assert!(!marker.exists(), "the command ran although leaktrace could not start");
    drop(busy);

    let t = start("conn_leak", &["--no-leak"]);
    let port = free_port();
    let mut child = Command::new(leaktrace())
        .args(["attach", "--pid", &t.pid().to_string(), "--for", "4s", "--interval", "1s", "--json"])
        .args(["--listen", &format!("localhost:{port}")])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let serving = lines.by_ref().map_while(Result::ok).find(|l| l.contains("serving metrics")).expect("no metrics server");
    assert!(serving.contains(&format!(":{port}/metrics")), "{serving}");
    std::thread::sleep(Duration::from_millis(1500));
    let body = http_get(&format!("127.0.0.1:{port}"), "/metrics");
    assert!(body.contains("leaktrace_up 1"), "{body}");
    assert!(child.wait().unwrap().success());
}

fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes()).unwrap();
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body
}

/// Whether `pid` exists and is not a zombie.
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !matches!(s.rsplit_once(')').and_then(|(_, r)| r.trim_start().chars().next()), Some('Z') | Some('X')))
        .unwrap_or(false)
}

/// A command `leaktrace run` started dies with leaktrace, even when
/// leaktrace is SIGKILLed: it never keeps running untraced.
#[test]
fn run_command_dies_with_leaktrace() {
    let mut child = Command::new(leaktrace())
        .args(["run", "--for", "60s", "--json", "--", "sleep", "1000"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let attached = lines.by_ref().map_while(Result::ok).find(|l| l.contains("attached to")).expect("never attached");
    let cmd_pid: u32 = attached.split_whitespace().nth(3).and_then(|p| p.parse().ok()).unwrap_or_else(|| panic!("{attached}"));
    assert!(running(cmd_pid), "{attached}");
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let until = Instant::now() + Duration::from_secs(5);
    while running(cmd_pid) && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(50));
    }
    let alive = running(cmd_pid);
    if alive {
        // SAFETY: cleaning up the sleep we made leaktrace start.
        unsafe { libc::kill(cmd_pid as i32, libc::SIGKILL) };
    }
    assert!(!alive, "the command kept running after leaktrace was killed");
}

/// What a command sees of its signals and limits, by a shell that prints
/// them (SigIgn, SigBlk, Max open files) and runs `yes | head -n 1`,
/// printing yes's exit status (141: killed by SIGPIPE).
const SEES: &str = r#"grep -E '^(SigIgn|SigBlk)' /proc/self/status; grep 'Max open files' /proc/self/limits; (yes; echo "yes exited $?" >&2) | head -n 1 >/dev/null"#;

/// `leaktrace run` starts the command as it would start untraced: the
/// SIGPIPE leaktrace's runtime ignores, its signal mask and its raised
/// descriptor limit do not leak into it (`yes | head` dies by SIGPIPE).
#[test]
fn a_traced_command_sees_what_an_untraced_one_sees() {
    let untraced = Command::new("sh").args(["-c", SEES]).output().unwrap();
    let untraced = String::from_utf8_lossy(&untraced.stdout).to_string() + &String::from_utf8_lossy(&untraced.stderr);
    assert!(untraced.contains("yes exited 141"), "{untraced}");
    // --json: the command's stdout goes to stderr, stdout carries JSON only.
    let run = run_leaktrace(&["run", "--json", "--", "sh", "-c", SEES]);
    assert_eq!(run.status, 0, "{}", run.stderr);
    let traced: Vec<&str> = run.stderr.lines().filter(|l| !l.starts_with("leaktrace")).collect();
    let untraced: Vec<&str> = untraced.lines().collect();
    assert_eq!(traced, untraced, "traced:\n{}", run.stderr);
}

/// A program whose name carries escape sequences (comm from its file name)
/// cannot clear the screen or recolour it: the table, `check`'s verdict and
/// the notes on stderr show the sequences escaped.
#[test]
fn escape_sequences_in_names_are_not_printed_raw() {
    let dir = std::env::temp_dir().join(format!("leaktrace-ansi-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bin = dir.join("x\x1b[2J\x1b[31mred");
    std::fs::copy(fixture("conn_leak"), &bin).unwrap();
    let run = run_leaktrace(&["check", "--for", "5s", "--interval", "1s", "--", bin.to_str().unwrap()]);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(run.status, 3, "{}", run.stderr);
    assert!(!run.stdout.contains('\x1b'), "raw escape on stdout: {:?}", run.stdout);
    assert!(!run.stderr.contains('\x1b'), "raw escape on stderr: {:?}", run.stderr);
    assert!(run.stdout.contains(r"(x\x1b[2J\x1b[31m"), "{}", run.stdout);
    assert!(run.stderr.contains(r"x\x1b[2J\x1b[31m"), "{}", run.stderr);
}

/// Root without capabilities (a bounded capability set, as in a container)
/// is told which capabilities are missing, not "failed to create map".
#[test]
fn missing_capabilities_are_named() {
    let t = start("conn_leak", &["--no-leak"]);
    let pid = t.pid().to_string();
    for (bounding, missing) in [("-all", "missing: CAP_BPF, CAP_PERFMON"), ("-bpf,-sys_admin", "missing: CAP_BPF (")] {
        let out = Command::new("setpriv")
            .args([&format!("--bounding-set={bounding}"), "--inh-caps=-all", "--"])
            .arg(leaktrace())
            .args(["attach", "--pid", &pid, "--for", "1s"])
            .output()
            .expect("setpriv (util-linux) is needed for this test");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.starts_with("leaktrace: error: permission denied: leaktrace needs CAP_BPF and CAP_PERFMON"), "{stderr}");
        assert!(stderr.contains(missing), "{stderr}");
    }
}

/// A target in its own mount namespace whose libc is another file than the
/// host's at the same path (a container): the allocation and thread probes
/// land on the target's libc, so its heap leak and its thread leak are found
/// (they were not: 2 events, PASS), and the look-alikes are not leaks.
#[test]
fn probes_land_on_the_libc_a_container_maps() {
    let libc = std::fs::canonicalize("/lib/x86_64-linux-gnu/libc.so.6").unwrap();
    let dir = std::env::temp_dir().join(format!("leaktrace-mntns-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let copy = dir.join("libc.so.6");
    std::fs::copy(&libc, &copy).unwrap();
    let in_namespace = |fixture_name: &str| {
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--propagation", "private", "--", "sh", "-c"]).arg(format!(
            "mount --bind {} {} && exec {}",
            copy.display(),
            libc.display(),
            fixture(fixture_name).display()
        ));
        start_command(cmd)
    };
    let t = in_namespace("alloc_leak");
    let pid = t.pid().to_string();
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let host_ino = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&libc).unwrap()).to_string();
    let line = maps.lines().find(|l| l.ends_with(libc.to_str().unwrap())).expect("no libc mapped");
    assert!(!line.contains(&format!(" {host_ino} ")), "the namespace maps the host's libc: {line}");
    let run = run_leaktrace(&["check", "--pid", &pid, "--for", "10s", "--interval", "1s", "--json", "--track", "allocations"]);
    assert_eq!(run.status, 3, "heap leak in a container not found: {}", run.stderr);
    let report = run.final_report();
    let all = summarize(&report);
    let leaks: Vec<_> = report["findings"].as_array().unwrap().iter().filter(|f| f["verdict"] == "leak").collect();
    assert_eq!(leaks.len(), 1, "{all}");
    assert_eq!(leaks[0]["site"], "make_record", "{all}");
    assert!(report["events"]["allocation"].as_u64().unwrap() > 10_000, "{all}");
    drop(t);

    let t = in_namespace("thread_leak");
    let run = run_leaktrace(&["check", "--pid", &t.pid().to_string(), "--for", "8s", "--interval", "1s", "--json", "--track", "threads"]);
    drop(t);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(run.status, 3, "thread leak in a container not found: {}", run.stderr);
    let report = run.final_report();
    let all = summarize(&report);
    let leaks: Vec<_> = report["findings"].as_array().unwrap().iter().filter(|f| f["verdict"] == "leak").collect();
    assert_eq!(leaks.len(), 1, "{all}");
    assert!(functions(leaks[0]).iter().any(|f| f == "start_watcher"), "{all}");
}

/// leaktrace in a PID namespace of its own (a container sharing the
/// target's, not the host's) is refused with one line: the kernel side
/// sees host pids and would have matched nothing (0 events, PASS).
#[test]
fn a_pid_namespace_other_than_the_hosts_is_refused() {
    let out = Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", "--", "sh", "-c"])
        .arg(format!("sleep 30 & exec {} check --pid $! --for 2s", leaktrace().display()))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("leaktrace: error: leaktrace runs in a PID namespace other than the host's (pid:["), "{stderr}");
}

/// A target whose executable was replaced on disk after it started is read
/// from the file it runs (map_files), not the new one: its leak is named by
/// its own functions (was `[unknown]` and `conn_leak_repl+0x13ac`).
#[test]
fn a_replaced_executable_is_read_from_what_runs() {
    let dir = std::env::temp_dir().join(format!("leaktrace-replaced-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bin = dir.join("conn_leak_repl");
    std::fs::copy(fixture("conn_leak"), &bin).unwrap();
    let t = start_command(Command::new(&bin));
    // Replace it as a package upgrade does: a new file renamed over it.
    let new = dir.join("conn_leak_repl.new");
    std::fs::copy(fixture("thread_leak"), &new).unwrap();
    std::fs::rename(&new, &bin).unwrap();
    let run = run_leaktrace(&["check", "--pid", &t.pid().to_string(), "--for", "6s", "--interval", "1s"]);
    drop(t);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(run.status, 3, "{}", run.stderr);
    assert!(run.stderr.contains("LEAK connection at dial_cache"), "{}", run.stderr);
    assert!(run.stderr.contains("created by dial_cache <- bad_handler <- request_loop"), "{}", run.stderr);
}

/// 5 000 distinct call paths creating sockets (one open per path, replaced
/// every 500 ms; nothing grows): stacks are kept (a kernel stack-map bucket
/// collision is walked instead of lost: ~14 % were lost), and nothing,
/// placeholder buckets included, is judged growing or a leak.
#[test]
fn many_distinct_stacks_are_kept_and_nothing_is_judged_growing() {
    let t = start("conn_paths", &["--paths", "5000"]);
    let run = run_leaktrace(&["attach", "--pid", &t.pid().to_string(), "--for", "8s", "--interval", "1s", "--json", "--track", "connections", "--max-findings", "10000"]);
    assert_eq!(run.status, 0, "{}", run.stderr);
    let report = run.final_report();
    let created = report["events"]["connection"].as_u64().unwrap() / 2;
    let lost = report["lost"]["stacks"].as_u64().unwrap();
    assert!(created > 40_000, "too few sockets seen: {created}");
    assert!(lost * 1000 <= created, "{lost} of {created} stacks lost");
    let findings = report["findings"].as_array().unwrap();
    let bad: Vec<_> = findings.iter().filter(|f| f["verdict"] == "leak" || f["verdict"] == "growing").collect();
    assert!(bad.is_empty(), "judged growing: {bad:?}");
    // One finding per path (its own stack), each with its one socket.
    let paths = findings.iter().filter(|f| functions(f).iter().any(|n| n == "open_socket")).count();
    assert!(paths >= 4990, "only {paths} distinct stacks of 5000");
}
