//! `cargo xtask safety [--minutes N | --seconds N]`: leaktrace must never
//! change what a traced program computes. For every Go build of the
//! workload fixture (1.19, 1.22, 1.24, 1.25, 1.27, 1.27 stripped): two
//! untraced rounds give the reference checksum (and show the work is
//! deterministic); then the fixture runs round after round while
//! `leaktrace attach --track connections,tasks,maps,locks` (every tracker
//! that applies to a Go program: `allocations` probes native allocators and
//! refuses Go code) traces it for the given time. Every traced round must
//! print the reference checksum, and the fixture must exit 0 on SIGTERM.
//! Default: 10 minutes per build (an hour in all); CI runs `--seconds 30`.

use std::process::{Command, Stdio};
use std::thread;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use crate::bench::{interrupt, start_ready};
use crate::build;
use crate::cmd::{announce, exit_code, fixtures_bin, is_root, leaktrace_bin, send_signal, wait_timeout};
use crate::cores::GO_BUILDS;

/// Every tracker that applies to a Go program.
const TRACKERS: &str = "connections,tasks,maps,locks";

/// The checksums a workload run printed, in order.
fn checksums(out: &str) -> Vec<String> {
    out.lines()
        .filter(|l| l.starts_with("round "))
        .filter_map(|l| l.split_whitespace().nth(3).map(str::to_string))
        .collect()
}

/// One build: (untraced checksum, traced rounds), or why it failed.
fn check_build(root: &std::path::Path, name: &str, seconds: u64) -> Result<(String, usize)> {
    let exe = fixtures_bin(root).join(name);
    let mut untraced = Command::new(&exe);
    untraced.args(["-rounds", "2"]);
    announce(&untraced);
    let out = untraced.output().with_context(|| format!("running {}", exe.display()))?;
    if !out.status.success() {
        bail!("untraced {name} failed: {}", out.status);
    }
    let reference = checksums(&String::from_utf8_lossy(&out.stdout));
    let [a, b] = &reference[..] else { bail!("untraced {name} printed {} rounds, not 2", reference.len()) };
    if a != b {
        bail!("untraced {name} is not deterministic: {a} then {b}");
    }

    let (mut target, lines) = start_ready(Command::new(&exe).args(["-rounds", "0"]), name)?;
    let mut tracer_cmd = Command::new(leaktrace_bin(root));
    tracer_cmd
        .args(["attach", "--pid", &target.id().to_string(), "--track", TRACKERS, "--for", &format!("{seconds}s")])
        .args(["--interval", "1s", "--format", "json"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    announce(&tracer_cmd);
    let mut tracer = tracer_cmd.spawn().context("starting leaktrace")?;
    let status = wait_timeout(&mut tracer, Duration::from_secs(seconds + 120))?;
    let tracer_status = match status {
        Some(st) => Some(st),
        None => interrupt(&mut tracer, "leaktrace", Duration::from_secs(20)),
    };
    let mut stderr = String::new();
    if let Some(mut e) = tracer.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut stderr);
    }
    // A round after detaching, then a clean stop.
    thread::sleep(Duration::from_millis(500));
    send_signal(target.id(), "TERM")?;
    let target_status = wait_timeout(&mut target, Duration::from_secs(30))?;
    if target_status.is_none() {
        let _ = target.kill();
        let _ = target.wait();
    }
    let all = lines.all(Duration::from_secs(5));
    if tracer_status.map(exit_code) != Some(0) {
        bail!("leaktrace on {name} did not end cleanly ({tracer_status:?}):\n{stderr}");
    }
    match target_status.map(exit_code) {
        Some(0) => {}
        other => bail!("{name} under leaktrace ended with {other:?} (not exit 0 on SIGTERM)"),
    }
    if !all.lines().any(|l| l.starts_with("done rounds=")) {
        bail!("{name} under leaktrace never printed `done`");
    }
    let traced = checksums(&all);
    if traced.is_empty() {
        bail!("{name} finished no round under leaktrace in {seconds} s");
    }
    if let Some((i, bad)) = traced.iter().enumerate().find(|(_, c)| *c != a) {
        bail!("{name}: round {i} under leaktrace printed checksum {bad}, untraced {a}");
    }
    Ok((a.clone(), traced.len()))
}

/// `cargo xtask safety [--minutes N | --seconds N]`.
pub fn run(root: &std::path::Path, args: &[String]) -> Result<i32> {
    let [minutes, seconds] = crate::bench::parse_options("safety", args, [("--minutes", 0), ("--seconds", 0)], &[])?;
    let seconds = match (minutes, seconds) {
        (0, 0) => 600,
        (m, 0) => m * 60,
        (0, s) => s,
        _ => return Err(anyhow!("safety: give --minutes or --seconds, not both")),
    };
    build::run(root)?;
    if !is_root() {
        bail!("safety: must run as root (leaktrace loads eBPF programs)");
    }
    let mut failed = Vec::new();
    let mut rows = Vec::new();
    for suffix in GO_BUILDS {
        let name = format!("workload-go{suffix}");
        match check_build(root, &name, seconds) {
            Ok((sum, rounds)) => {
                eprintln!("safety: {name}: {rounds} rounds (before, during and after a {seconds} s trace), every one checksum {sum} as untraced");
                rows.push(format!("| {name} | {seconds} s | {rounds} | {sum} | same |"));
            }
            Err(e) => {
                eprintln!("safety: {name}: FAIL: {e:#}");
                rows.push(format!("| {name} | {seconds} s | - | - | FAIL |"));
                failed.push(name);
            }
        }
    }
    println!("\n| build | traced for | rounds run (before, during, after the trace) | checksum | vs untraced |\n|---|---|---|---|---|");
    for r in &rows {
        println!("{r}");
    }
    if failed.is_empty() {
        Ok(0)
    } else {
        println!("safety: FAIL: {}", failed.join(", "));
        Ok(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_round_checksums() {
        let out = "ready\nround 0 checksum 00ff\nround 1 checksum 00ff\ndone rounds=2\n";
        assert_eq!(checksums(out), ["00ff", "00ff"]);
    }
}
