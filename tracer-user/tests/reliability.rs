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
