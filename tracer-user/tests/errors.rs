//! Bad input gets a clear one-line error and a non-zero exit; signals
//! detach everything.

mod common;

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::Duration,
};

use common::*;

#[test]
fn no_such_pid() {
    let run = run_leaktrace(&["attach", "--pid", "999999999", "--for", "1s"]);
    assert_eq!(run.status, 1);
    assert_eq!(error_line(&run), "leaktrace: error: no such process: 999999999");
}

#[test]
fn unknown_and_unavailable_trackers() {
    let run = run_leaktrace(&["attach", "--pid", "1", "--track", "sockets"]);
    // A command-line error: 2, as docs/report.md documents (was 1).
    assert_eq!(run.status, 2);
    assert!(error_line(&run).contains("unknown tracker 'sockets'"));
    // The error lists every tracker this build has.
    assert!(error_line(&run).contains("connections,fds,tasks,maps,allocations,locks"), "{}", error_line(&run));
}

#[test]
fn bad_flags() {
    let run = run_leaktrace(&["attach", "--pid", "1", "--interval", "soon"]);
    assert_eq!(run.status, 2);
    assert!(run.stderr.contains("invalid value 'soon'"), "{}", run.stderr);
    let run = run_leaktrace(&["check"]);
    // A command-line error: 2, as docs/report.md documents (was 1).
    assert_eq!(run.status, 2);
    assert!(error_line(&run).contains("--pid PID or -- CMD"));
    let run = run_leaktrace(&["run", "--for", "1s", "--", "/nonexistent/cmd"]);
    assert_eq!(run.status, 1);
    assert!(error_line(&run).contains("command not found: /nonexistent/cmd"));
}

#[test]
fn not_permitted_without_root() {
    let t = start("conn_leak", &["--no-leak"]);
    let pid = t.pid().to_string();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", "--"])
        .arg(leaktrace())
        .args(["attach", "--pid", &pid, "--for", "1s"])
        .output()
        .expect("setpriv (util-linux) is needed for this test");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(lines[0].starts_with("leaktrace: error: permission denied"), "{stderr}");
}

/// Ids of the BPF objects (`prog_id` or `link_id`) process `pid` holds
/// open, from /proc/PID/fdinfo.
fn bpf_ids_of(pid: u32, field: &str) -> Vec<u64> {
    let mut ids = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo")).unwrap().flatten() {
        let info = std::fs::read_to_string(entry.path()).unwrap_or_default();
        for line in info.lines() {
            if let Some(v) = line.strip_prefix(field) {
                if let Ok(id) = v.trim_start_matches(':').trim().parse() {
                    ids.push(id);
                }
            }
        }
    }
    ids.sort();
    ids.dedup();
    ids
}

/// Ids of every BPF program or link on the machine (bpftool).
fn all_bpf_ids(what: &str) -> Vec<u64> {
    let out = Command::new("bpftool").args(["-j", what, "show"]).output().expect("bpftool is needed for this test");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    v.as_array().into_iter().flatten().filter_map(|p| p["id"].as_u64()).collect()
}

fn signal_detaches_everything(sig: libc::c_int) {
    let t = start("conn_leak", &[]);
    let pid = t.pid().to_string();
    let mut child = Command::new(leaktrace())
        .args(["attach", "--pid", &pid, "--interval", "1s", "--format", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = read_all(child.stdout.take().unwrap());
    let mut err_lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let attached = err_lines.next().unwrap().unwrap();
    assert!(attached.contains("attached to"), "{attached}");
    std::thread::sleep(Duration::from_secs(2));
    let progs = bpf_ids_of(child.id(), "prog_id");
    let links = bpf_ids_of(child.id(), "link_id");
    assert!(progs.len() >= 8, "leaktrace holds no BPF programs? {progs:?}");
    assert!(links.len() >= 8, "leaktrace holds no BPF links? {links:?}");
    assert!(all_bpf_ids("prog").contains(&progs[0]), "bpftool does not list our programs");
    let uprobes_before = std::fs::read_to_string("/sys/kernel/tracing/uprobe_events").unwrap_or_default();
    // SAFETY: signalling our child.
    unsafe { libc::kill(child.id() as i32, sig) };
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "leaktrace must exit 0 after a signal");
    let rest: Vec<String> = err_lines.map_while(Result::ok).collect();
    assert!(rest.iter().any(|l| l.contains("detached")), "{rest:?}");
    let stdout = out.join().unwrap();
    let last = stdout.lines().last().unwrap();
    assert!(last.contains("\"final\":true"), "no final report after signal: {last}");
    // The kernel frees a program once its last reference goes, some of them
    // from a workqueue after the fds close (links, tail-call arrays): give
    // it a moment, not forever.
    let left_of = |kind: &str, ours: &[u64]| -> Vec<u64> {
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        loop {
            let left: Vec<u64> = all_bpf_ids(kind).into_iter().filter(|id| ours.contains(id)).collect();
            if left.is_empty() || std::time::Instant::now() > deadline {
                return left;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let left = left_of("prog", &progs);
    assert!(left.is_empty(), "programs left loaded 3 s after exit: {left:?}");
    let left = left_of("link", &links);
    assert!(left.is_empty(), "links left attached 3 s after exit: {left:?}");
    let uprobes_after = std::fs::read_to_string("/sys/kernel/tracing/uprobe_events").unwrap_or_default();
    assert_eq!(uprobes_before, uprobes_after, "tracefs uprobe events changed");
    assert!(!uprobes_after.contains("leaktrace"), "leaktrace left uprobe events: {uprobes_after}");
}

#[test]
fn sigterm_detaches_everything() {
    signal_detaches_everything(libc::SIGTERM);
}

#[test]
fn ctrl_c_detaches_everything() {
    signal_detaches_everything(libc::SIGINT);
}
