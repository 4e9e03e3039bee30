//! `cargo xtask bench unwind [--runs N] [--seconds N]`: what the unwinder
//! (`--unwind eh-frame`, the default) costs, in one run:
//! - per frame: `unwind_bench` (gcc -O2, no frame pointers) makes sockets
//!   at the bottom of a recursion 2 and 22 frames deep; the BPF time per
//!   socket event (`kernel.bpf_stats_enabled`, measured after a warm-up so
//!   that every rule is learned) differs by the walk of 20 frames;
//! - with a large target: a JVM (`SocketLoop`, libjvm.so and the JDK's
//!   other objects) — time from `leaktrace attach` to its first report, and
//!   leaktrace's peak RSS after tracing it, with rules and with `--unwind fp`.

use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::connections::{max_program_id, program_totals};
use super::{interrupt, log_until_attached, median, parse_options, start_ready, wait_attached, Lines};
use crate::cmd::{announce, fixtures_bin, leaktrace_bin, run_cmd, status_kib, stop_child, target_dir};

const SHALLOW: u64 = 2;
const DEEP: u64 = 22;

/// `(run_time_ns, run_cnt)` of this run's `conn_socket_exit` program.
fn socket_totals(after: u64) -> Option<(f64, f64)> {
    let out = Command::new("bpftool").args(["prog", "show"]).output().ok()?;
    program_totals(&String::from_utf8_lossy(&out.stdout), "conn_socket_exit", after)
}

/// Starts `leaktrace attach` on `pid` with `args`; returns once attached.
fn attach(root: &Path, pid: u32, args: &[&str], log: &str) -> Result<Child> {
    let mut cmd = Command::new(leaktrace_bin(root));
    cmd.args(["attach", "--pid", &pid.to_string(), "--interval", "1s", "--format", "json"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    announce(&cmd);
    let mut tracer = cmd.spawn().context("starting leaktrace")?;
    let log_path = target_dir(root).join("xtask-bench").join(log);
    let (rx, _logger) = log_until_attached(tracer.stderr.take().unwrap(), log_path.clone());
    if wait_attached(&rx, &mut tracer, Duration::from_secs(60)).is_err() {
        interrupt(&mut tracer, "leaktrace", Duration::from_secs(5));
        bail!("leaktrace did not attach (log: {})", log_path.display());
    }
    Ok(tracer)
}

/// BPF ns per socket event of `unwind_bench --depth depth`, over `secs`
/// seconds after a 2 s warm-up.
fn ns_per_event(root: &Path, depth: u64, secs: u64, run: usize) -> Result<f64> {
    let mut cmd = Command::new(fixtures_bin(root).join("unwind_bench"));
    cmd.args(["--depth", &depth.to_string()]);
    let (mut target, _out) = start_ready(&mut cmd, "unwind_bench")?;
    let before = max_program_id();
    let mut tracer = match attach(root, target.id(), &["--track", "connections"], &format!("unwind-{depth}-{run}.log")) {
        Ok(t) => t,
        Err(e) => {
            stop_child(&mut target, "unwind_bench");
            return Err(e);
        }
    };
    std::thread::sleep(Duration::from_secs(2));
    let start = socket_totals(before);
    std::thread::sleep(Duration::from_secs(secs));
    let end = socket_totals(before);
    interrupt(&mut tracer, "leaktrace", Duration::from_secs(10));
    stop_child(&mut target, "unwind_bench");
    match (start, end) {
        (Some((t0, n0)), Some((t1, n1))) if n1 > n0 => Ok((t1 - t0) / (n1 - n0)),
        _ => bail!("no BPF run time for leaktrace's socket program (bpftool, kernel.bpf_stats_enabled)"),
    }
}

/// Compiles SocketLoop.java into target/xtask-bench/java (the JDK's javac).
fn build_java(root: &Path) -> Result<std::path::PathBuf> {
    let out = target_dir(root).join("xtask-bench").join("java");
    fs::create_dir_all(&out)?;
    let src = root.join("fixtures/java/SocketLoop.java");
    run_cmd(Command::new("javac").arg("-d").arg(&out).arg(&src)).context("javac (setup installs default-jdk-headless)")?;
    Ok(out)
}

/// Distinct files mapped by `pid`, and how many of them are shared objects.
fn mapped_objects(pid: u32) -> (usize, usize) {
    let maps = fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    let mut paths: Vec<&str> = maps.lines().filter_map(|l| l.split_whitespace().nth(5)).filter(|p| p.starts_with('/')).collect();
    paths.sort_unstable();
    paths.dedup();
    (paths.len(), paths.iter().filter(|p| p.contains(".so")).count())
}

/// What one trace of the JVM measured.
struct JvmRun {
    /// To the `attached` line: every program verified and attached.
    attached_s: f64,
    /// To the first report on stdout: attached, then one `--interval` (1 s).
    first_report_s: f64,
    peak_rss_kib: u64,
    note: String,
}

/// Attaches to the running JVM `pid` for `secs` seconds with `unwind`:
/// time to the first report on stdout, leaktrace's peak RSS at the end.
fn trace_jvm(root: &Path, pid: u32, unwind: &str, secs: u64) -> Result<JvmRun> {
    let mut cmd = Command::new(leaktrace_bin(root));
    cmd.args(["attach", "--pid", &pid.to_string(), "--interval", "1s", "--format", "json", "--unwind", unwind])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    announce(&cmd);
    let t0 = Instant::now();
    let mut tracer = cmd.spawn().context("starting leaktrace")?;
    let mut out = Lines::new(tracer.stdout.take().unwrap());
    let mut err = Lines::new(tracer.stderr.take().unwrap());
    if !err.wait_line("attached to", Duration::from_secs(60)) {
        interrupt(&mut tracer, "leaktrace", Duration::from_secs(5));
        bail!("leaktrace did not attach within 60 s:\n{}", err.seen());
    }
    let attached_s = t0.elapsed().as_secs_f64();
    if !out.wait_line("", Duration::from_secs(60)) {
        interrupt(&mut tracer, "leaktrace", Duration::from_secs(5));
        bail!("leaktrace printed no report within 60 s");
    }
    let first_report_s = t0.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_secs(secs).saturating_sub(t0.elapsed()));
    let peak_rss_kib = status_kib(tracer.id(), "VmHWM:").unwrap_or(0);
    interrupt(&mut tracer, "leaktrace", Duration::from_secs(15));
    err.wait_line("detached", Duration::from_secs(5));
    let note = err.seen().lines().find(|l| l.contains("unwinding: ")).unwrap_or("").trim().to_string();
    Ok(JvmRun { attached_s, first_report_s, peak_rss_kib, note })
}

pub fn run(root: &Path, args: &[String]) -> Result<()> {
    let [runs, secs] = parse_options("bench unwind", args, [("--runs", 3), ("--seconds", 5)], &["--runs", "--seconds"])?;
    fs::create_dir_all(target_dir(root).join("xtask-bench"))?;
    let stats_before = fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").unwrap_or_default();
    let _ = fs::write("/proc/sys/kernel/bpf_stats_enabled", "1");
    let result = measure(root, runs as usize, secs);
    let _ = fs::write("/proc/sys/kernel/bpf_stats_enabled", if stats_before.trim() == "1" { "1" } else { "0" });
    result
}

fn measure(root: &Path, runs: usize, secs: u64) -> Result<()> {
    // Per frame: both depths in each round, the slope per round.
    let (mut shallow, mut deep, mut slope) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..runs {
        let s = ns_per_event(root, SHALLOW, secs, run)?;
        let d = ns_per_event(root, DEEP, secs, run)?;
        eprintln!("bench unwind: round {}: {s:.0} ns/event at depth {SHALLOW}, {d:.0} at depth {DEEP}", run + 1);
        shallow.push(s);
        deep.push(d);
        slope.push((d - s) / (DEEP - SHALLOW) as f64);
    }

    // A large target: the JVM.
    let classes = build_java(root)?;
    let mut cmd = Command::new("java");
    cmd.args(["-Xmx256m", "-cp"]).arg(&classes).arg("SocketLoop");
    let (mut jvm, _out) = start_ready(&mut cmd, "java SocketLoop")?;
    // Let it settle (JIT compiler threads, the loop's classes).
    std::thread::sleep(Duration::from_secs(2));
    let (files, shared_objects) = mapped_objects(jvm.id());
    let libjvm_mb = fs::read_to_string(format!("/proc/{}/maps", jvm.id()))
        .ok()
        .and_then(|m| m.lines().find_map(|l| l.split_whitespace().nth(5).filter(|p| p.ends_with("/libjvm.so")).map(String::from)))
        .and_then(|p| fs::metadata(p).ok())
        .map_or(0, |m| m.len() / 1_000_000);
    let mut rules = Vec::new();
    let mut fp = Vec::new();
    for _ in 0..runs {
        rules.push(trace_jvm(root, jvm.id(), "eh-frame", secs)?);
        fp.push(trace_jvm(root, jvm.id(), "fp", secs)?);
    }
    stop_child(&mut jvm, "java");

    println!("\nbench unwind ({runs} rounds; BPF time per socket event after a 2 s warm-up, {secs} s each)");
    println!("unwind_bench (gcc -O2, no frame pointers), conn_socket_exit ns/event:");
    println!("  depth {SHALLOW:>2}: {:.0} ns (per round {})", median(&shallow), super::list(&shallow, 0));
    println!("  depth {DEEP:>2}: {:.0} ns (per round {})", median(&deep), super::list(&deep, 0));
    println!(
        "  per frame (slope over {} frames): {:.1} ns (per round {}); goal <= 60 ns",
        DEEP - SHALLOW,
        median(&slope),
        super::list(&slope, 1)
    );
    println!("JVM (java SocketLoop: {files} mapped files, {shared_objects} of them shared objects; libjvm.so {libjvm_mb} MB):");
    for (name, v) in [("--unwind eh-frame", &rules), ("--unwind fp", &fp)] {
        let attached: Vec<f64> = v.iter().map(|r| r.attached_s).collect();
        let first: Vec<f64> = v.iter().map(|r| r.first_report_s).collect();
        let rss: Vec<f64> = v.iter().map(|r| r.peak_rss_kib as f64 / 1024.0).collect();
        println!(
            "  {name:<18} attached {:.2} s (per run {}), first report {:.2} s (per run {}), peak RSS {:.1} MiB (per run {})",
            median(&attached),
            super::list(&attached, 2),
            median(&first),
            super::list(&first, 2),
            median(&rss),
            super::list(&rss, 1)
        );
    }
    if let Some(r) = rules.last() {
        println!("  last rules run: {}", r.note);
    }
    Ok(())
}
